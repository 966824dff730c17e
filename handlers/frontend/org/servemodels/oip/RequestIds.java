package org.servemodels.oip;

import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpResponse;
import java.util.UUID;

/**
 * Every request on every HTTP port gets one request ID, and every answer carries it back as X-Request-ID: the
 * client's own X-Request-ID when it is valid (1 to 128 visible ASCII characters), else a new UUID. It sits right
 * behind the HTTP codec, so it sees each request's head before anything can answer it, and each answer's head
 * whoever writes it (TorchServe, the OIP endpoint, the OpenAI routes, a refusal from BodyAdmission, a stream).
 * The ID replaces the request's header, so what reads the request later sees the same one: TorchServe's Session
 * (our substitute, handlers/frontend/patch) takes it as the request's ID, which the access log prints and the job
 * hands to the worker, and the handler reads it from the request's headers for its log lines and an OIP answer's
 * id. The IDs wait for their answers in the order of the requests (PerAnswer).
 */
public final class RequestIds extends PerAnswer<String> {

    public static final String HEADER = "x-request-id";
    public static final int MAX_LENGTH = 128;
    /** Whether a client's request ID may be kept: 1 to MAX_LENGTH characters, each visible ASCII (no space). */
    public static boolean valid(String id) {
        if (id == null || id.isEmpty() || id.length() > MAX_LENGTH) {
            return false;
        }
        for (int i = 0; i < id.length(); i++) {
            char c = id.charAt(i);
            if (c < 0x21 || c > 0x7e) {
                return false;
            }
        }
        return true;
    }

    /** The client's ID when it is valid, else a new one. */
    public static String chosen(String offered) {
        return valid(offered) ? offered : UUID.randomUUID().toString();
    }

    @Override
    String read(HttpRequest request) {
        String id = chosen(request.headers().get(HEADER));
        request.headers().set(HEADER, id);
        return id;
    }

    @Override
    void answered(HttpResponse response, String id) {
        response.headers().set(HEADER, id);
    }
}
