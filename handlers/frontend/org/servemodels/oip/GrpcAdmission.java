package org.servemodels.oip;

import com.google.protobuf.MessageLite;
import io.grpc.Context;
import io.grpc.Contexts;
import io.grpc.Deadline;
import io.grpc.ForwardingServerCall;
import io.grpc.ForwardingServerCallListener;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.Status;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import org.pytorch.serve.http.Session;
import org.pytorch.serve.util.messages.RequestInput;
import org.slf4j.Logger;

/**
 * The gRPC ports' share of BodyAdmission's byte budget (called by our GRPCInterceptor, which TorchServe installs
 * on both gRPC services).
 *
 * <p>TorchServe's gRPC services hold each request message whole until it is answered, like the REST bodies, and
 * count only requests (job_queue_size) and one message's size (max_request_size): measured here, 100 clients each
 * sending 8 MiB Predictions calls exhausted the frontend's heap within seconds (the JVM exited, the supervisor
 * restarted it). Here a message over BodyAdmission.SMALL_BODY reserves its serialized size from the same budget as
 * the REST bodies (max_held_request_bytes) when it arrives; past the budget the call ends at once with
 * RESOURCE_EXHAUSTED ("retry with backoff") and the message is dropped. The reservation goes back when the call
 * closes, or when its client cancels it.
 *
 * <p>It also keeps what the frontend knows of the call in the call's Context, for its jobs: TorchServe's gRPC
 * services make each job's request with no headers and a UUID of their own, so a worker could not name the call's
 * request ID, tell how long it queued, honour its deadline or join its trace. The agent ends GRPCJob's inference
 * constructors with `adopt` (MethodEdits), which gives the request the headers an HTTP request of ours carries:
 * x-request-id, x-received-ms (RequestFacts), X-Request-Timeout-Ms from the call's deadline (grpc-timeout, what a
 * gRPC client's timeout sets), and the client's traceparent and tracestate.
 */
public final class GrpcAdmission {
    /** The call's request ID (org.servemodels.oip.RequestIds), in its response headers, or trailers. */
    public static final Metadata.Key<String> ID_KEY = Metadata.Key.of(RequestIds.HEADER, Metadata.ASCII_STRING_MARSHALLER);

    static final String TIMEOUT = "x-request-timeout-ms";
    static final String TRACE = "traceparent";
    static final String TRACE_STATE = "tracestate";
    private static final Context.Key<Facts> FACTS = Context.key("servemodels-grpc-call");

    /** What a job of the call hands to the worker: null fields are not sent. */
    record Facts(String id, long receivedMs, String timeoutMs, String traceparent, String tracestate) {}

    private GrpcAdmission() {}

    /**
     * Starts `call` (TorchServe's access logging on close kept), with its request messages admitted by bytes, and
     * the call's facts in the Context its service runs in.
     */
    public static <ReqT, RespT> ServerCall.Listener<ReqT> start(ServerCall<ReqT, RespT> call, Metadata headers,
            ServerCallHandler<ReqT, RespT> next, Session session, String requestId, Logger accessLog) {
        AtomicLong reserved = new AtomicLong();
        Counted<ReqT, RespT> counted = new Counted<>(call, session, requestId, accessLog, reserved);
        Deadline deadline = Context.current().getDeadline();
        String timeout = deadline == null ? null
                : Long.toString(Math.max(0, deadline.timeRemaining(TimeUnit.MILLISECONDS)));
        Facts facts = new Facts(requestId, System.currentTimeMillis(), timeout, text(headers, TRACE),
                text(headers, TRACE_STATE));
        Context context = Context.current().withValue(FACTS, facts);
        return new Admitted<>(Contexts.interceptCall(context, counted, headers, next), counted, reserved);
    }

    /**
     * Called at the end of GRPCJob's inference constructors (the agent's edit): `request` takes its gRPC call's
     * facts as headers. The job keeps TorchServe's own unique ID (a batch holds its jobs by ID; two calls may carry
     * one x-request-id); the worker names a request by its x-request-id header first.
     */
    public static void adopt(RequestInput request) {
        Facts facts = FACTS.get();
        if (facts == null) { // a job made outside a gRPC call of ours
            return;
        }
        request.updateHeaders(RequestIds.HEADER, facts.id());
        request.updateHeaders(RequestFacts.RECEIVED, Long.toString(facts.receivedMs()));
        if (facts.timeoutMs() != null) {
            request.updateHeaders(TIMEOUT, facts.timeoutMs());
        }
        if (facts.traceparent() != null) {
            request.updateHeaders(TRACE, facts.traceparent());
        }
        if (facts.tracestate() != null) {
            request.updateHeaders(TRACE_STATE, facts.tracestate());
        }
    }

    private static String text(Metadata headers, String name) {
        return headers.get(Metadata.Key.of(name, Metadata.ASCII_STRING_MARSHALLER));
    }

    /** A listener that answers nothing: for a call closed before it started. */
    public static <ReqT> ServerCall.Listener<ReqT> nothing() {
        return new ServerCall.Listener<ReqT>() {};
    }

    static final class Counted<ReqT, RespT> extends ForwardingServerCall.SimpleForwardingServerCall<ReqT, RespT> {
        private final Session session;
        private final String requestId;
        private final Logger accessLog;
        private final AtomicLong reserved;
        private boolean closed;
        private boolean headersSent;

        Counted(ServerCall<ReqT, RespT> call, Session session, String requestId, Logger accessLog,
                AtomicLong reserved) {
            super(call);
            this.session = session;
            this.requestId = requestId;
            this.accessLog = accessLog;
            this.reserved = reserved;
        }

        @Override
        public synchronized void sendHeaders(Metadata headers) {
            headersSent = true;
            headers.put(ID_KEY, requestId);
            super.sendHeaders(headers);
        }

        @Override
        public synchronized void close(Status status, Metadata trailers) {
            if (closed) {
                return; // the call was refused already: TorchServe's own close after it changes nothing
            }
            closed = true;
            if (!headersSent) { // a call answered with trailers alone (an error) carries its ID there
                trailers.put(ID_KEY, requestId);
            }
            session.setCode(status.getCode().value());
            accessLog.info(session.toString());
            BodyAdmission.release(reserved.getAndSet(0));
            super.close(status, trailers);
        }
    }

    static final class Admitted<ReqT, RespT> extends ForwardingServerCallListener.SimpleForwardingServerCallListener<ReqT> {
        private final Counted<ReqT, RespT> call;
        private final AtomicLong reserved;
        private volatile boolean refused;

        Admitted(ServerCall.Listener<ReqT> delegate, Counted<ReqT, RespT> call, AtomicLong reserved) {
            super(delegate);
            this.call = call;
            this.reserved = reserved;
        }

        @Override
        public void onMessage(ReqT message) {
            long bytes = message instanceof MessageLite ? ((MessageLite) message).getSerializedSize() : 0;
            long taken = BodyAdmission.admit(bytes);
            if (taken < 0) {
                refused = true;
                call.close(Status.RESOURCE_EXHAUSTED.withDescription("the server holds " + (BodyAdmission.held() >> 20)
                        + " MiB of request bodies (max_held_request_bytes: " + (BodyAdmission.budget() >> 20)
                        + " MiB), no room for a message of " + bytes + " bytes; retry with backoff"), new Metadata());
                return;
            }
            reserved.addAndGet(taken);
            super.onMessage(message);
        }

        @Override
        public void onHalfClose() {
            if (!refused) {
                super.onHalfClose();
            }
        }

        @Override
        public void onReady() {
            if (!refused) {
                super.onReady();
            }
        }

        @Override
        public void onCancel() {
            BodyAdmission.release(reserved.getAndSet(0));
            if (!refused) {
                super.onCancel();
            }
        }

        @Override
        public void onComplete() {
            if (!refused) {
                super.onComplete();
            }
        }
    }
}
