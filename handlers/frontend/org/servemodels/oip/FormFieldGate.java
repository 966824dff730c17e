package org.servemodels.oip;

import io.netty.buffer.ByteBuf;
import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaderValues;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.handler.codec.http.QueryStringDecoder;
import io.netty.handler.codec.http.multipart.HttpPostRequestDecoder;
import java.nio.charset.StandardCharsets;
import org.pytorch.serve.archive.DownloadArchiveException;
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.archive.workflow.WorkflowException;
import org.pytorch.serve.http.HttpRequestHandlerChain;
import org.pytorch.serve.util.NettyUtils;
import org.pytorch.serve.wlm.WorkerInitializationException;

/**
 * Put in front of TorchServe's inference handlers by our HttpRequestHandlerChain. TorchServe expands a
 * form-encoded or multipart body into one object per field on the frontend's heap (Netty's
 * HttpPostRequestDecoder) and sends every field to the worker: a body of max_request_size bytes holding millions
 * of empty fields costs hundreds of MB of heap and of worker memory. This gate counts a form body's fields in one
 * pass over its bytes, allocating nothing, and answers 413 past max_form_fields (config.properties; 16 unless set)
 * before anything is expanded. Other bodies pass untouched.
 */
public final class FormFieldGate extends HttpRequestHandlerChain {
    static final int DEFAULT_MAX_FIELDS = 16;
    private final HttpRequestHandlerChain next;
    private final int maxFields;

    /** The answer's "type": what the client sent too much of. */
    static final class TooManyFormFields extends RuntimeException {
        private static final long serialVersionUID = 1L;

        TooManyFormFields(String message) {
            super(message);
        }
    }

    public FormFieldGate(HttpRequestHandlerChain next) {
        this.next = next;
        this.maxFields = (int) Math.min(Integer.MAX_VALUE, Settings.number("max_form_fields", DEFAULT_MAX_FIELDS));
    }

    @Override
    public void handleRequest(ChannelHandlerContext ctx, FullHttpRequest req, QueryStringDecoder decoder,
            String[] segments) throws ModelException, DownloadArchiveException, WorkflowException,
                    WorkerInitializationException {
        long fields = fields(req, maxFields);
        if (fields > maxFields) {
            NettyUtils.sendError(ctx, HttpResponseStatus.REQUEST_ENTITY_TOO_LARGE, new TooManyFormFields(
                    "the form body has more than " + maxFields + " fields (max_form_fields); send one field per "
                            + "input, or the input as the raw body"));
            return;
        }
        next.handleRequest(ctx, req, decoder, segments);
    }

    /** How many fields TorchServe would expand `req`'s body into, counted up to `limit` + 1; 0 if not a form. */
    static long fields(FullHttpRequest req, int limit) {
        ByteBuf body = req.content();
        if (HttpPostRequestDecoder.isMultipart(req)) {
            String boundary = boundary(req.headers().get(HttpHeaderNames.CONTENT_TYPE));
            return boundary == null ? 0 : delimiters(body, ("--" + boundary).getBytes(StandardCharsets.ISO_8859_1), limit);
        }
        CharSequence type = HttpUtil.getMimeType(req);
        if (type != null && HttpHeaderValues.APPLICATION_X_WWW_FORM_URLENCODED.contentEqualsIgnoreCase(type)) {
            if (!body.isReadable()) {
                return 0;
            }
            long[] count = {1};
            body.forEachByte(b -> b != '&' || ++count[0] <= limit);
            return count[0];
        }
        return 0;
    }

    static String boundary(String contentType) {
        if (contentType == null) {
            return null;
        }
        for (String parameter : contentType.split(";")) {
            String[] pair = parameter.trim().split("=", 2);
            if (pair.length == 2 && "boundary".equalsIgnoreCase(pair[0].trim())) {
                String value = pair[1].trim();
                if (value.length() >= 2 && value.startsWith("\"") && value.endsWith("\"")) {
                    value = value.substring(1, value.length() - 1);
                }
                return value.isEmpty() ? null : value;
            }
        }
        return null;
    }

    /**
     * Occurrences of `delimiter` at the body's start or right after a line feed: an upper bound of the parts (the
     * closing delimiter counts too). Linear: a comparison starts at a line feed and the delimiter holds none.
     */
    static long delimiters(ByteBuf body, byte[] delimiter, int limit) {
        long count = 0;
        int end = body.writerIndex();
        for (int i = body.readerIndex(); i < end && count <= limit + 1L; i++) {
            boolean lineStart = i == body.readerIndex() || body.getByte(i - 1) == '\n';
            if (!lineStart) {
                int feed = body.indexOf(i, end, (byte) '\n');
                if (feed < 0) {
                    break;
                }
                i = feed; // the loop moves to the byte after the line feed
                continue;
            }
            int j = 0;
            while (j < delimiter.length && i + j < end && body.getByte(i + j) == delimiter[j]) {
                j++;
            }
            if (j == delimiter.length) {
                count++;
            }
        }
        // n parts are framed by n + 1 delimiters
        return Math.max(0, count - 1);
    }
}
