package org.servemodels.oip;

import io.netty.channel.ChannelDuplexHandler;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelPromise;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpResponse;
import io.netty.handler.codec.http.HttpResponseStatus;
import java.util.ArrayDeque;

/**
 * A handler behind the HTTP codec that keeps something of each request's head until its answer's head goes out:
 * answers on one connection go out in the order of its requests (HTTP/1.1, pipelined or not), so what each request
 * left waits in that order (at most MAX_WAITING; the oldest is dropped past it). RequestIds and RequestTraces.
 */
abstract class PerAnswer<T> extends ChannelDuplexHandler {

    private static final int MAX_WAITING = 256; // requests of one connection still unanswered (pipelined)

    private final ArrayDeque<T> waiting = new ArrayDeque<>();

    /** What to keep of a request's head (it may change the head's headers); never null. */
    abstract T read(HttpRequest request);

    /** The answer's head of the request that left `kept` is going out (it may change its headers). */
    abstract void answered(HttpResponse response, T kept);

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) throws Exception {
        if (msg instanceof HttpRequest) {
            T kept = read((HttpRequest) msg);
            if (waiting.size() == MAX_WAITING) {
                waiting.pollFirst();
            }
            waiting.addLast(kept);
        }
        ctx.fireChannelRead(msg);
    }

    @Override
    public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise) throws Exception {
        if (msg instanceof HttpResponse) {
            HttpResponse response = (HttpResponse) msg;
            if (!HttpResponseStatus.CONTINUE.equals(response.status())) {
                T kept = waiting.pollFirst();
                if (kept != null) {
                    answered(response, kept);
                }
            }
        }
        ctx.write(msg, promise);
    }
}
