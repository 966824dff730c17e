package org.servemodels.oip;

import io.netty.buffer.Unpooled;
import io.netty.channel.ChannelDuplexHandler;
import io.netty.channel.ChannelFutureListener;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelPromise;
import io.netty.handler.codec.http.DefaultFullHttpResponse;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpContent;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaderValues;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpResponse;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.handler.codec.http.LastHttpContent;
import io.netty.handler.codec.http.QueryStringDecoder;
import io.netty.util.ReferenceCountUtil;
import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.Iterator;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.atomic.AtomicLong;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;

/**
 * Admission by bytes, per frontend (one per channel, in front of the aggregator; see our ServerInitializer).
 *
 * <p>TorchServe holds every request body whole: while it arrives (Netty's aggregator, direct memory) and then as a
 * heap copy until the request is answered, queued or not. Its own limits count requests (job_queue_size per
 * model) and the size of one body (max_request_size), so 300 connections each sending a body of the maximum size
 * exhausted the frontend's memory: every request failed, small ones too, and it did not recover.
 *
 * <p>Here the bytes of every body that declares more than SMALL_BODY bytes (or no length) are reserved, as they
 * arrive, from one budget shared by every channel, max_held_request_bytes (config.properties; 256 MiB unless
 * set), and given back when the request's response is written. A body that does not fit is answered 503 at
 * once; the rest of it is read and dropped (nothing is held) and its connection is then closed. Reserving what
 * arrives rather than what is declared means a client that declares a large body and sends it slowly holds only
 * what it sent. A request
 * whose client went away before its answer keeps its reservation until its model's job queue has been empty once
 * (TorchServe still runs such a job, holding its body), so clients that disconnect cannot queue bodies past the
 * budget either. Small bodies pass uncounted: what they hold is bounded by the job queues (docs/operations.md).
 */
public final class BodyAdmission extends ChannelDuplexHandler {
    static final long DEFAULT_BUDGET = 256L << 20;
    static final long SMALL_BODY = 64L << 10;
    static final AtomicLong held = new AtomicLong();
    static final ConcurrentLinkedQueue<Orphan> orphans = new ConcurrentLinkedQueue<>();
    private static volatile long budget = -1;

    private final ArrayDeque<Reservation> outstanding = new ArrayDeque<>();
    private Reservation current; // the request whose body is arriving
    private boolean discarding;

    /** What one request holds: its bytes so far, counted against the budget or not. */
    static final class Reservation {
        final String model;
        final boolean counted;
        long bytes;

        Reservation(String model, boolean counted) {
            this.model = model;
            this.counted = counted;
        }
    }

    record Orphan(long bytes, String model) {}

    public BodyAdmission() {}

    /**
     * Reserves a body held outside this handler (a gRPC message: GrpcAdmission): the bytes reserved (0 for a small
     * body, which passes uncounted), or -1 when the budget has no room for it.
     */
    public static long admit(long bytes) {
        if (bytes <= SMALL_BODY) {
            return 0;
        }
        return reserve(bytes) ? bytes : -1;
    }

    /** Gives back what admit reserved. */
    public static void release(long bytes) {
        if (bytes > 0) {
            held.addAndGet(-bytes);
        }
    }

    public static long budget() {
        if (budget < 0) {
            budget = Settings.number("max_held_request_bytes", DEFAULT_BUDGET);
        }
        return budget;
    }

    /** Bytes held for request bodies now (reservations, orphans included). */
    public static long held() {
        return held.get();
    }

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) throws Exception {
        if (discarding) { // the rest of a refused body: read and dropped, so the client reads our answer
            ReferenceCountUtil.release(msg);
            if (msg instanceof LastHttpContent) {
                discarding = false;
                ctx.close();
            }
            return;
        }
        if (msg instanceof HttpRequest) {
            HttpRequest request = (HttpRequest) msg;
            long declared = HttpUtil.getContentLength(request, -1L);
            boolean counted = declared < 0 ? HttpUtil.isTransferEncodingChunked(request) : declared > SMALL_BODY;
            current = new Reservation(model(request.uri()), counted);
            outstanding.add(current);
        }
        if (msg instanceof HttpContent && current != null) {
            Reservation arriving = current;
            if (msg instanceof LastHttpContent) {
                current = null;
            }
            long bytes = ((HttpContent) msg).content().readableBytes();
            if (arriving.counted && bytes > 0) {
                if (!reserve(bytes)) {
                    outstanding.remove(arriving);
                    held.addAndGet(-arriving.bytes);
                    current = null;
                    boolean whole = msg instanceof LastHttpContent;
                    discarding = !whole;
                    ReferenceCountUtil.release(msg);
                    refuse(ctx, arriving.bytes + bytes, whole);
                    return;
                }
                arriving.bytes += bytes;
            }
        }
        ctx.fireChannelRead(msg);
    }

    @Override
    public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise) throws Exception {
        if (msg instanceof HttpResponse && ((HttpResponse) msg).status().code() >= 200) {
            Reservation done = outstanding.poll();
            if (done != null) {
                held.addAndGet(-done.bytes);
                if (done == current) {
                    current = null; // answered before its body ended (413 from the aggregator)
                }
            }
        }
        ctx.write(msg, promise);
    }

    @Override
    public void channelInactive(ChannelHandlerContext ctx) throws Exception {
        orphan();
        ctx.fireChannelInactive();
    }

    @Override
    public void handlerRemoved(ChannelHandlerContext ctx) {
        orphan();
    }

    private void orphan() {
        current = null;
        for (Reservation left = outstanding.poll(); left != null; left = outstanding.poll()) {
            if (left.model == null || left.bytes == 0) {
                held.addAndGet(-left.bytes);
            } else {
                orphans.add(new Orphan(left.bytes, left.model));
            }
        }
    }

    static boolean reserve(long bytes) {
        for (int attempt = 0; attempt < 2; attempt++) {
            long now = held.get();
            while (now + bytes <= budget()) {
                if (held.compareAndSet(now, now + bytes)) {
                    return true;
                }
                now = held.get();
            }
            if (attempt == 0 && !releaseOrphans()) {
                return false;
            }
        }
        return false;
    }

    /** Gives back the reservations of answered-to-nobody requests whose model has no queued job left. */
    static boolean releaseOrphans() {
        boolean released = false;
        for (Iterator<Orphan> it = orphans.iterator(); it.hasNext(); ) {
            Orphan orphan = it.next();
            if (queueEmpty(orphan.model())) {
                it.remove();
                held.addAndGet(-orphan.bytes());
                released = true;
            }
        }
        return released;
    }

    static boolean queueEmpty(String name) {
        try {
            Model model = ModelManager.getInstance().getModel(name, null);
            return model == null || model.getPendingRequestsInJobQueue() == 0;
        } catch (Exception e) { // NOPMD: a model that is gone holds no job
            return true;
        }
    }

    /** The model an inference request is for, from its path; null for any other request. */
    static String model(String uri) {
        String[] segments = new QueryStringDecoder(uri).path().split("/");
        if (segments.length >= 3 && ("predictions".equals(segments[1]) || "explanations".equals(segments[1]))) {
            return segments[2];
        }
        if (segments.length >= 4 && ("v1".equals(segments[1]) || "v2".equals(segments[1]))
                && "models".equals(segments[2])) {
            return segments[3].split(":", 2)[0];
        }
        return null;
    }

    /**
     * Answers 503 and closes the connection: at once when the whole body has arrived, else once the rest of it has
     * been read and dropped (closing on unread bytes would reset the connection before the client reads this).
     */
    private static void refuse(ChannelHandlerContext ctx, long bytes, boolean whole) {
        String body = "{\n  \"code\": 503,\n  \"type\": \"ServerBusy\",\n  \"message\": \"the server holds "
                + (held.get() >> 20) + " MiB of request bodies (max_held_request_bytes: " + (budget() >> 20)
                + " MiB), no room for a body of " + bytes + " bytes and more; retry with backoff\"\n}\n";
        FullHttpResponse response = new DefaultFullHttpResponse(HttpVersion.HTTP_1_1,
                HttpResponseStatus.SERVICE_UNAVAILABLE, Unpooled.copiedBuffer(body, StandardCharsets.UTF_8));
        response.headers().set(HttpHeaderNames.CONTENT_TYPE, HttpHeaderValues.APPLICATION_JSON);
        response.headers().set(HttpHeaderNames.CONTENT_LENGTH, response.content().readableBytes());
        response.headers().set(HttpHeaderNames.CONNECTION, HttpHeaderValues.CLOSE);
        response.headers().set(HttpHeaderNames.RETRY_AFTER, "1");
        // written past this handler: a refused request holds no reservation to give back
        if (whole) {
            ctx.writeAndFlush(response).addListener(ChannelFutureListener.CLOSE);
        } else {
            ctx.writeAndFlush(response);
        }
    }
}
