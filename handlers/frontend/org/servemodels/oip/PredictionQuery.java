package org.servemodels.oip;

import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.QueryStringDecoder;

/**
 * TorchServe 0.12 hands a request's query parameters to the handler as request fields on its legacy routes
 * (/predict, /invocations), but drops them on /predictions/{model}[/{version}] (its handlePredictions passes no
 * query to parseRequest). This step carries a prediction's raw query string to the handler in one header,
 * x-query-parameters, which handlers/requests.py (with_query) turns back into request fields: where a kind reads a
 * request's own knobs (the detector's score_threshold and max_detections). The header is removed from every request
 * first, so only this class sets it. The query is bounded by the HTTP codec's initial-line limit.
 */
public final class PredictionQuery extends ChannelInboundHandlerAdapter {

    static final String HEADER = "x-query-parameters";

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) throws Exception {
        if (msg instanceof HttpRequest) {
            HttpRequest request = (HttpRequest) msg;
            request.headers().remove(HEADER);
            QueryStringDecoder decoder = new QueryStringDecoder(request.uri());
            String query = decoder.rawQuery();
            if (!query.isEmpty() && decoder.path().startsWith("/predictions/")) {
                request.headers().set(HEADER, query);
            }
        }
        ctx.fireChannelRead(msg);
    }
}
