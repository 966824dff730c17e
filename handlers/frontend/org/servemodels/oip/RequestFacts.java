package org.servemodels.oip;

import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.QueryStringDecoder;

/**
 * What the frontend knows of a request that TorchServe 0.12 does not hand to the handler, as headers that only this
 * class sets (each is removed from every request first):
 *
 * <ul>
 *   <li>x-query-parameters: a /predictions/{model}[/{version}] request's raw query string. TorchServe gives a
 *       request's query parameters to the handler as request fields on its legacy routes (/predict, /invocations)
 *       but drops them here (its handlePredictions passes no query to parseRequest); handlers/requests.py
 *       (with_query) turns them back into fields, where a kind reads a request's own knobs. Bounded by the HTTP
 *       codec's initial-line limit.
 *   <li>x-received-ms: when the whole request had arrived, in milliseconds since the epoch, so the handler can
 *       tell how long it queued and answer one whose deadline (X-Request-Timeout-Ms) passed meanwhile with a 504,
 *       without computing it (handlers/requests.py, expired).
 * </ul>
 */
public final class RequestFacts extends ChannelInboundHandlerAdapter {

    static final String QUERY = "x-query-parameters";
    static final String RECEIVED = "x-received-ms";

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) throws Exception {
        if (msg instanceof HttpRequest) {
            HttpRequest request = (HttpRequest) msg;
            request.headers().remove(QUERY);
            request.headers().set(RECEIVED, Long.toString(System.currentTimeMillis()));
            QueryStringDecoder decoder = new QueryStringDecoder(request.uri());
            String query = decoder.rawQuery();
            if (!query.isEmpty() && decoder.path().startsWith("/predictions/")) {
                request.headers().set(QUERY, query);
            }
        }
        ctx.fireChannelRead(msg);
    }
}
