package org.servemodels.oip;

import com.google.protobuf.MessageLite;
import io.grpc.ForwardingServerCall;
import io.grpc.ForwardingServerCallListener;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.Status;
import java.util.concurrent.atomic.AtomicLong;
import org.pytorch.serve.http.Session;
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
 */
public final class GrpcAdmission {
    /** The call's request ID (org.servemodels.oip.RequestIds), in its response headers, or trailers. */
    public static final Metadata.Key<String> ID_KEY = Metadata.Key.of(RequestIds.HEADER, Metadata.ASCII_STRING_MARSHALLER);

    private GrpcAdmission() {}

    /** Starts `call` (TorchServe's access logging on close kept), with its request messages admitted by bytes. */
    public static <ReqT, RespT> ServerCall.Listener<ReqT> start(ServerCall<ReqT, RespT> call, Metadata headers,
            ServerCallHandler<ReqT, RespT> next, Session session, Logger accessLog) {
        AtomicLong reserved = new AtomicLong();
        Counted<ReqT, RespT> counted = new Counted<>(call, session, accessLog, reserved);
        return new Admitted<>(next.startCall(counted, headers), counted, reserved);
    }

    /** A listener that answers nothing: for a call closed before it started. */
    public static <ReqT> ServerCall.Listener<ReqT> nothing() {
        return new ServerCall.Listener<ReqT>() {};
    }

    static final class Counted<ReqT, RespT> extends ForwardingServerCall.SimpleForwardingServerCall<ReqT, RespT> {
        private final Session session;
        private final Logger accessLog;
        private final AtomicLong reserved;
        private boolean closed;
        private boolean headersSent;

        Counted(ServerCall<ReqT, RespT> call, Session session, Logger accessLog, AtomicLong reserved) {
            super(call);
            this.session = session;
            this.accessLog = accessLog;
            this.reserved = reserved;
        }

        @Override
        public synchronized void sendHeaders(Metadata headers) {
            headersSent = true;
            headers.put(ID_KEY, session.getRequestId());
            super.sendHeaders(headers);
        }

        @Override
        public synchronized void close(Status status, Metadata trailers) {
            if (closed) {
                return; // the call was refused already: TorchServe's own close after it changes nothing
            }
            closed = true;
            if (!headersSent) { // a call answered with trailers alone (an error) carries its ID there
                trailers.put(ID_KEY, session.getRequestId());
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
