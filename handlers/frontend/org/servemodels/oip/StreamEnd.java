package org.servemodels.oip;

import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import io.netty.buffer.Unpooled;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelOutboundHandlerAdapter;
import io.netty.channel.ChannelPromise;
import io.netty.handler.codec.http.DefaultHttpContent;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpResponse;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.handler.codec.http.LastHttpContent;
import io.netty.util.ReferenceCountUtil;
import java.nio.charset.StandardCharsets;

/**
 * Ends a streamed answer cleanly when its request fails after the stream began. TorchServe answers a job whose
 * worker died with a whole error response; once the head of a chunked answer (a generator's tokens) went out, those
 * bytes would land inside the stream as garbage. Here they become the stream's last chunk, in its own form: for
 * Server-Sent Events an event carrying OpenAI's error object and then {@code data: [DONE]}; for JSON lines a line
 * {@code {"error", "type", "code"}}; otherwise the error's JSON. The status stays the one already sent (200).
 */
public final class StreamEnd extends ChannelOutboundHandlerAdapter {

    private String streaming; // the media type of the chunked answer in progress on this connection, or null

    @Override
    public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise) throws Exception {
        if (msg instanceof FullHttpResponse && streaming != null) {
            FullHttpResponse error = (FullHttpResponse) msg;
            String body = error.content().toString(StandardCharsets.UTF_8);
            int status = error.status().code();
            ReferenceCountUtil.release(msg);
            String type = streaming;
            streaming = null;
            ctx.write(new DefaultHttpContent(Unpooled.copiedBuffer(lastChunk(type, status, body),
                    StandardCharsets.UTF_8)));
            ctx.write(LastHttpContent.EMPTY_LAST_CONTENT, promise);
            return;
        }
        if (msg instanceof HttpResponse && !(msg instanceof FullHttpResponse)
                && HttpUtil.isTransferEncodingChunked((HttpResponse) msg)) {
            String type = ((HttpResponse) msg).headers().get(HttpHeaderNames.CONTENT_TYPE);
            streaming = type == null ? "" : type;
        } else if (msg instanceof LastHttpContent) {
            streaming = null;
        }
        ctx.write(msg, promise);
    }

    static String lastChunk(String type, int status, String body) {
        String message = "the answer broke off: " + status + " " + body.replace('\n', ' ').trim();
        JsonObject error = new JsonObject();
        error.addProperty("message", message);
        if (type.startsWith("text/event-stream")) {
            error.addProperty("type", "server_error");
            error.add("param", JsonNull.INSTANCE);
            error.addProperty("code", "stream_interrupted");
            JsonObject event = new JsonObject();
            event.add("error", error);
            return "data: " + event + "\n\ndata: [DONE]\n\n";
        }
        JsonObject line = new JsonObject();
        line.addProperty("error", message);
        line.addProperty("type", "StreamInterrupted");
        line.addProperty("code", status);
        return line + (type.startsWith("application/jsonl") ? "\n" : "");
    }
}
