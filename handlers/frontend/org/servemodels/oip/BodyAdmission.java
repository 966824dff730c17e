package org.servemodels.oip;

import io.netty.buffer.Unpooled;
import io.netty.channel.ChannelDuplexHandler;
import io.netty.channel.ChannelFuture;
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
import io.netty.handler.timeout.IdleStateEvent;
import io.netty.util.ReferenceCountUtil;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.SocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.Iterator;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.atomic.AtomicLong;
import org.pytorch.serve.util.ConnectorType;
import org.pytorch.serve.util.TokenAuthorization;
import org.pytorch.serve.util.TokenAuthorization.TokenType;
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
 *
 * <p>Four more guards, all decided before a body is held (docs/operations.md, "Who may hold what"):
 *
 * <ul>
 *   <li>The key is checked when a request's headers arrive, on the inference and management ports alike (the
 *       API description and OPTIONS too, which TorchServe answers before its own check): a request without the
 *       port's key is answered 401 and holds no byte of its body, which is read and dropped; its connection then
 *       closes.
 *   <li>A body that stops arriving for request_read_timeout_s seconds (10 unless set) is dropped with a 408 and
 *       its bytes are given back; so is a refused body whose rest never comes.
 *   <li>One client address holds at most max_held_request_bytes_per_client (half the budget unless set).
 *   <li>The budget fits the heap: what TorchServe does with a held body costs about HEAP_COPIES times its bytes of
 *       heap (the job's copy, the plugin's read, the batch sent to the worker, the answer), so the budget in force
 *       is at most (max heap - HEAP_RESERVE) / HEAP_COPIES, whatever max_held_request_bytes says.
 * </ul>
 *
 * <p>Writes push back: a connection whose answers are not being read (its outbound buffer past the channel's high
 * water mark, set in our ServerInitializer) is not read from until it drains, and the requests already decoded
 * from it wait here; a client that pipelines requests and never reads the answers holds one buffer, not the heap.
 */
public final class BodyAdmission extends ChannelDuplexHandler {
    static final long DEFAULT_BUDGET = 256L << 20;
    static final long SMALL_BODY = 64L << 10;
    // Heap a held body costs, in copies of its bytes, and the heap the frontend needs besides (measured: 27 queued
    // 8 MiB binary OIP bodies, 216 MiB, ran -Xmx1g out in 6 tries of 7; 16, 128 MiB, never did).
    static final long HEAP_COPIES = 6;
    static final long HEAP_RESERVE = 256L << 20;
    static final long DEFAULT_READ_TIMEOUT_S = 10;
    static final AtomicLong held = new AtomicLong();
    static final ConcurrentHashMap<InetAddress, Long> heldBy = new ConcurrentHashMap<>(); // no entry: holds nothing
    static final ConcurrentLinkedQueue<Orphan> orphans = new ConcurrentLinkedQueue<>();
    private static volatile long budget = -1;
    private static volatile long clientBudget = -1;

    private final ConnectorType connector;
    private final ArrayDeque<Reservation> outstanding = new ArrayDeque<>();
    private final ArrayDeque<Object> waiting = new ArrayDeque<>(); // decoded while the answers were not read
    private InetAddress client;
    private Reservation current; // the request whose body is arriving
    private boolean discarding;

    /** What one request holds: its bytes so far, counted against the budget or not. */
    static final class Reservation {
        final String model;
        final boolean counted;
        final InetAddress client; // whose share it is charged to, null for the budget alone
        long bytes;

        Reservation(String model, boolean counted, InetAddress client) {
            this.model = model;
            this.counted = counted;
            this.client = client;
        }
    }

    record Orphan(long bytes, String model, InetAddress client) {}

    /** The guard of one channel of `connector` (which key its requests need). */
    public BodyAdmission(ConnectorType connector) {
        this.connector = connector;
    }

    /**
     * Reserves a body held outside this handler (a gRPC message: GrpcAdmission): the bytes reserved (0 for a small
     * body, which passes uncounted), or -1 when the budget has no room for it.
     */
    public static long admit(long bytes) {
        if (bytes <= SMALL_BODY) {
            return 0;
        }
        return reserve(bytes, null) ? bytes : -1;
    }

    /** Gives back what admit reserved. */
    public static void release(long bytes) {
        give(bytes, null);
    }

    /** The budget in force: max_held_request_bytes, at most what the heap holds (heapFit). */
    public static long budget() {
        if (budget < 0) {
            long configured = Settings.number("max_held_request_bytes", DEFAULT_BUDGET);
            long fit = heapFit(Runtime.getRuntime().maxMemory());
            if (fit < configured) {
                System.err.println("max_held_request_bytes=" + configured + " is more than a heap of "
                        + (Runtime.getRuntime().maxMemory() >> 20) + " MiB holds; using " + fit
                        + " (raise -Xmx in vmargs to hold more)");
            }
            budget = Math.min(configured, fit);
        }
        return budget;
    }

    /** The most bytes of bodies a heap of `maxHeap` bytes holds with the frontend's own needs beside them. */
    static long heapFit(long maxHeap) {
        return Math.max(SMALL_BODY, (maxHeap - HEAP_RESERVE) / HEAP_COPIES);
    }

    /** The most one client address may hold: max_held_request_bytes_per_client, at most the budget. */
    static long clientBudget() {
        if (clientBudget < 0) {
            clientBudget = Math.min(budget(), Settings.number("max_held_request_bytes_per_client", budget() / 2));
        }
        return clientBudget;
    }

    /** Bytes held for request bodies now (reservations, orphans included). */
    public static long held() {
        return held.get();
    }

    @Override
    public void channelActive(ChannelHandlerContext ctx) throws Exception {
        client = address(ctx.channel().remoteAddress());
        ctx.fireChannelActive();
    }

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) throws Exception {
        if (!waiting.isEmpty() || !ctx.channel().isWritable()) { // answers unread: hold what was decoded, read no more
            waiting.add(msg);
            ctx.channel().config().setAutoRead(false);
            return;
        }
        admitted(ctx, msg);
    }

    @Override
    public void channelWritabilityChanged(ChannelHandlerContext ctx) throws Exception {
        while (ctx.channel().isWritable() && !waiting.isEmpty()) {
            admitted(ctx, waiting.poll());
        }
        if (ctx.channel().isWritable() && waiting.isEmpty()) {
            ctx.channel().config().setAutoRead(true);
        }
        ctx.fireChannelWritabilityChanged();
    }

    @Override
    public void userEventTriggered(ChannelHandlerContext ctx, Object event) throws Exception {
        // a body (or the rest of a refused one) that stopped arriving, or whose client stopped reading our answers
        // (we read no more of it then): either way its bytes are not held longer
        if (event instanceof IdleStateEvent && (current != null || discarding)) {
            if (current != null) {
                outstanding.remove(current);
                give(current.bytes, current.client);
                current = null;
                answer(ctx, HttpResponseStatus.REQUEST_TIMEOUT, "RequestTimeout", "no byte of the body arrived for "
                        + readTimeoutSeconds() + " s (request_read_timeout_s); send the whole body without pausing");
            }
            discarding = false;
            ctx.close();
            return;
        }
        ctx.fireUserEventTriggered(event);
    }

    /** Seconds a body may pause before it is dropped: request_read_timeout_s. */
    public static long readTimeoutSeconds() {
        return Settings.number("request_read_timeout_s", DEFAULT_READ_TIMEOUT_S);
    }

    private void admitted(ChannelHandlerContext ctx, Object msg) {
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
            if (!authorized(request)) {
                discarding = !(msg instanceof LastHttpContent);
                ReferenceCountUtil.release(msg);
                answer(ctx, HttpResponseStatus.UNAUTHORIZED, "Unauthorized", "Token Authorization failed: send this "
                        + "port's key as Authorization: Bearer <key> (key_file.json of the server's working directory)");
                if (!discarding) {
                    ctx.close();
                }
                return;
            }
            long declared = HttpUtil.getContentLength(request, -1L);
            boolean counted = declared < 0 ? HttpUtil.isTransferEncodingChunked(request) : declared > SMALL_BODY;
            current = new Reservation(model(request.uri()), counted, client);
            outstanding.add(current);
        }
        if (msg instanceof HttpContent && current != null) {
            Reservation arriving = current;
            if (msg instanceof LastHttpContent) {
                current = null;
            }
            long bytes = ((HttpContent) msg).content().readableBytes();
            if (arriving.counted && bytes > 0) {
                if (!reserve(bytes, arriving.client)) {
                    outstanding.remove(arriving);
                    give(arriving.bytes, arriving.client);
                    current = null;
                    boolean whole = msg instanceof LastHttpContent;
                    discarding = !whole;
                    ReferenceCountUtil.release(msg);
                    refuse(ctx, arriving.bytes + bytes, arriving.client, whole);
                    return;
                }
                arriving.bytes += bytes;
            }
        }
        ctx.fireChannelRead(msg);
    }

    /**
     * Whether the request carries the key its port takes (TorchServe's own rule: the inference key on the inference
     * port; the management key on the management port, the API key for its /token routes). The metrics port takes
     * none, as in TorchServe; with token authorization off every request passes.
     */
    private boolean authorized(HttpRequest request) {
        if (Boolean.FALSE.equals(TokenAuthorization.isEnabled()) || ConnectorType.METRICS_CONNECTOR.equals(connector)) {
            return true;
        }
        String header = request.headers().get(HttpHeaderNames.AUTHORIZATION);
        String token = header == null ? null : TokenAuthorization.parseTokenFromBearerTokenHeader(header);
        boolean tokenApi = new QueryStringDecoder(request.uri()).path().startsWith("/token");
        boolean inference = ConnectorType.INFERENCE_CONNECTOR.equals(connector);
        boolean management = ConnectorType.MANAGEMENT_CONNECTOR.equals(connector);
        boolean all = !inference && !management; // one port for both: either key
        return ((inference || all) && TokenAuthorization.checkTokenAuthorization(token, TokenType.INFERENCE))
                || ((management || all) && TokenAuthorization.checkTokenAuthorization(token,
                        tokenApi ? TokenType.TOKEN_API : TokenType.MANAGEMENT));
    }

    static InetAddress address(SocketAddress remote) {
        return remote instanceof InetSocketAddress ? ((InetSocketAddress) remote).getAddress() : null;
    }

    @Override
    public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise) throws Exception {
        if (msg instanceof HttpResponse && ((HttpResponse) msg).status().code() >= 200) {
            Reservation done = outstanding.poll();
            if (done != null) {
                give(done.bytes, done.client);
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
        for (Object left = waiting.poll(); left != null; left = waiting.poll()) {
            ReferenceCountUtil.release(left);
        }
        for (Reservation left = outstanding.poll(); left != null; left = outstanding.poll()) {
            if (left.model == null || left.bytes == 0) {
                give(left.bytes, left.client);
            } else {
                orphans.add(new Orphan(left.bytes, left.model, left.client));
            }
        }
    }

    /** Reserves `bytes` from the budget and from `client`'s share of it (null: the budget alone). */
    static boolean reserve(long bytes, InetAddress client) {
        for (int attempt = 0; attempt < 2; attempt++) {
            if (takeShare(client, bytes)) {
                if (take(held, bytes, budget())) {
                    return true;
                }
                giveShare(client, bytes); // the client's share had room, the budget had none
            }
            if (attempt == 0 && !releaseOrphans()) {
                return false;
            }
        }
        return false;
    }

    /** Charges `bytes` to `client`'s share when it has room (one atomic step per address). */
    private static boolean takeShare(InetAddress client, long bytes) {
        if (client == null) {
            return true;
        }
        boolean[] taken = {false};
        heldBy.compute(client, (address, now) -> {
            long before = now == null ? 0 : now;
            taken[0] = before + bytes <= clientBudget();
            return taken[0] ? Long.valueOf(before + bytes) : now;
        });
        return taken[0];
    }

    private static void giveShare(InetAddress client, long bytes) {
        if (client != null) {
            heldBy.computeIfPresent(client, (address, now) -> now - bytes > 0 ? Long.valueOf(now - bytes) : null);
        }
    }

    private static boolean take(AtomicLong counter, long bytes, long limit) {
        long now = counter.get();
        while (now + bytes <= limit) {
            if (counter.compareAndSet(now, now + bytes)) {
                return true;
            }
            now = counter.get();
        }
        return false;
    }

    /** Gives `bytes` back to the budget and to `client`'s share (null: the budget alone). */
    static void give(long bytes, InetAddress client) {
        if (bytes > 0) {
            held.addAndGet(-bytes);
            giveShare(client, bytes);
        }
    }

    /** Gives back the reservations of answered-to-nobody requests whose model has no queued job left. */
    static boolean releaseOrphans() {
        boolean released = false;
        for (Iterator<Orphan> it = orphans.iterator(); it.hasNext(); ) {
            Orphan orphan = it.next();
            if (queueEmpty(orphan.model())) {
                it.remove();
                give(orphan.bytes(), orphan.client());
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
    private static void refuse(ChannelHandlerContext ctx, long bytes, InetAddress client, boolean whole) {
        long theirs = client == null ? 0 : heldBy.getOrDefault(client, 0L);
        String why = theirs + bytes > clientBudget()
                ? "this client holds " + (theirs >> 20) + " MiB of request bodies (max_held_request_bytes_per_client: "
                        + (clientBudget() >> 20) + " MiB)"
                : "the server holds " + (held.get() >> 20) + " MiB of request bodies (max_held_request_bytes: "
                        + (budget() >> 20) + " MiB)";
        ChannelFuture written = answer(ctx, HttpResponseStatus.SERVICE_UNAVAILABLE, "ServerBusy",
                why + ", no room for a body of " + bytes + " bytes and more; retry with backoff");
        if (whole) {
            written.addListener(ChannelFutureListener.CLOSE);
        }
    }

    /**
     * Writes our JSON error and says the connection closes (written past this handler: a refused request holds no
     * reservation to give back).
     */
    private static ChannelFuture answer(ChannelHandlerContext ctx, HttpResponseStatus status, String type,
            String message) {
        String body = "{\n  \"code\": " + status.code() + ",\n  \"type\": \"" + type + "\",\n  \"message\": \""
                + message.replace("\"", "'") + "\"\n}\n";
        FullHttpResponse response = new DefaultFullHttpResponse(HttpVersion.HTTP_1_1, status,
                Unpooled.copiedBuffer(body, StandardCharsets.UTF_8));
        response.headers().set(HttpHeaderNames.CONTENT_TYPE, HttpHeaderValues.APPLICATION_JSON);
        response.headers().set(HttpHeaderNames.CONTENT_LENGTH, response.content().readableBytes());
        response.headers().set(HttpHeaderNames.CONNECTION, HttpHeaderValues.CLOSE);
        if (status.code() == 503) {
            response.headers().set(HttpHeaderNames.RETRY_AFTER, "1");
        } else if (status.code() == 401) {
            response.headers().set(HttpHeaderNames.WWW_AUTHENTICATE, "Bearer");
        }
        return ctx.writeAndFlush(response);
    }
}
