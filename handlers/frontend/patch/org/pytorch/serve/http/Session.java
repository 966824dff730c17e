package org.pytorch.serve.http;

import io.netty.handler.codec.http.HttpRequest;
import java.util.UUID;
import org.servemodels.oip.RequestIds;

/**
 * TorchServe 0.12.0's Session (one request's access-log record and the ID its job carries to the worker), with the
 * request's own ID (`chosenId`): the X-Request-ID that org.servemodels.oip.RequestIds chose for an HTTP request (the
 * client's when valid), and for a gRPC call the one GRPCInterceptor chose from its x-request-id metadata; the
 * access-log line ends with it. Its job keeps a UUID of its own (`getRequestId`, what TorchServe asks for): a batch
 * holds its jobs by that ID, so two requests in one batch that carried the same X-Request-ID would leave one of them
 * unanswered. The worker reads the request's own ID from its x-request-id header. Substituted for TorchServe's by
 * the frontend agent (FrontendPatches).
 */
public class Session {
    static {
        org.servemodels.oip.FrontendPatches.inForce("org/pytorch/serve/http/Session");
    }

    private String requestId;
    private final String jobId = UUID.randomUUID().toString();
    private String remoteIp;
    private String method;
    private String uri;
    private String protocol;
    private int code;
    private long startTime;

    public Session(String remoteIp, HttpRequest request) {
        this.remoteIp = remoteIp;
        this.uri = request.uri();
        if (request.decoderResult().isSuccess()) {
            method = request.method().name();
            protocol = request.protocolVersion().text();
        } else {
            method = "GET";
            protocol = "HTTP/1.1";
        }
        requestId = RequestIds.chosen(request.headers().get(RequestIds.HEADER));
        startTime = System.currentTimeMillis();
    }

    public Session(String remoteIp, String uri) {
        this(remoteIp, uri, null);
    }

    /** A gRPC call's record: `requestId` is the client's x-request-id metadata (kept when valid). */
    public Session(String remoteIp, String uri, String requestId) {
        this.remoteIp = remoteIp;
        this.uri = uri;
        method = "gRPC";
        protocol = "HTTP/2.0";
        this.requestId = RequestIds.chosen(requestId);
        startTime = System.currentTimeMillis();
    }

    /** The ID of the request's job: unique, whatever the client sent (NettyUtils hands it to the job). */
    public String getRequestId() {
        return jobId;
    }

    /** The request's own ID: the client's when valid (RequestIds.chosen), else a new one. */
    public String chosenId() {
        return requestId;
    }

    public void setCode(int code) {
        this.code = code;
    }

    @Override
    public String toString() {
        long duration = System.currentTimeMillis() - startTime;
        return remoteIp + " \"" + method + " " + uri + ' ' + protocol + "\" " + code + ' ' + duration + " id="
                + requestId;
    }
}
