package org.servemodels.oip;

import io.netty.channel.ChannelDuplexHandler;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelPromise;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpResponse;
import io.netty.handler.codec.http.HttpResponseStatus;
import java.util.ArrayDeque;
import java.util.UUID;

/**
 * Every request on every HTTP port gets one request ID, and every answer carries it back as X-Request-ID: the
 * client's own X-Request-ID when it is valid (1 to 128 visible ASCII characters), else a new UUID. It sits right
 * behind the HTTP codec, so it sees each request's head before anything can answer it, and each answer's head
 * whoever writes it (TorchServe, the OIP endpoint, the OpenAI routes, a refusal from BodyAdmission, a stream).
 * The ID replaces the request's header, so what reads the request later sees the same one: TorchServe's Session
 * (our substitute, handlers/frontend/patch) takes it as the request's ID, which the access log prints and the job
 * hands to the worker, and the handler reads it from the request's headers for its log lines and an OIP answer's
 * id. Answers on one connection go out in the order of its requests (HTTP/1.1), so the IDs wait in that order.
 */
public final class RequestIds extends ChannelDuplexHandler {

    public static final String HEADER = "x-request-id";
    public static final int MAX_LENGTH = 128;
    private static final int MAX_WAITING = 256; // requests of one connection still unanswered (pipelined)

    private final ArrayDeque<String> waiting = new ArrayDeque<>();

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
    public void channelRead(ChannelHandlerContext ctx, Object msg) throws Exception {
        if (msg instanceof HttpRequest) {
            HttpRequest request = (HttpRequest) msg;
            String id = chosen(request.headers().get(HEADER));
            request.headers().set(HEADER, id);
            if (waiting.size() == MAX_WAITING) {
                waiting.pollFirst();
            }
            waiting.addLast(id);
        }
        ctx.fireChannelRead(msg);
    }

    @Override
    public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise) throws Exception {
        if (msg instanceof HttpResponse) {
            HttpResponse response = (HttpResponse) msg;
            if (!HttpResponseStatus.CONTINUE.equals(response.status())) {
                String id = waiting.pollFirst();
                if (id != null) {
                    response.headers().set(HEADER, id);
                }
            }
        }
        ctx.write(msg, promise);
    }
}
