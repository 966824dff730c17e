package org.servemodels.oip;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.buffer.Unpooled;
import io.netty.channel.ChannelFutureListener;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.handler.codec.http.DefaultFullHttpResponse;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaderValues;
import io.netty.handler.codec.http.HttpMethod;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.handler.codec.http.QueryStringDecoder;
import io.netty.util.ReferenceCountUtil;
import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.Map;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;

/**
 * The OpenAI API's routes on the inference port, as plain routes into TorchServe's own prediction path:
 *
 * <pre>
 *   GET  /v1/models, /v1/models/{m}      the models that speak the OpenAI API (answered here)
 *   POST /v1/chat/completions            -> /predictions/{model}, header x-openai-route: chat.completions
 *   POST /v1/completions                 -> /predictions/{model}, header x-openai-route: completions
 *   POST /v1/embeddings                  -> /predictions/{model}, header x-openai-route: embeddings
 * </pre>
 *
 * The body's "model" picks the model; the request then goes on as that model's prediction, so the queue, batching
 * (continuous batching for a generator), streamed chunks and metrics are TorchServe's own, and the handler answers
 * in the route's shapes (handlers/openai.py). Which routes a model speaks is in its archive's signature.json
 * ("openai"), written from its kind. Sits behind BodyAdmission (the key is checked there) and the aggregator; the
 * route header is removed from every other request, so only this class sets it. Errors are OpenAI's error object.
 */
public final class OpenAiRoutes extends ChannelInboundHandlerAdapter {

    static final String ROUTE_HEADER = "x-openai-route";

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) throws Exception {
        if (!(msg instanceof FullHttpRequest)) {
            ctx.fireChannelRead(msg);
            return;
        }
        FullHttpRequest request = (FullHttpRequest) msg;
        request.headers().remove(ROUTE_HEADER);
        String path = new QueryStringDecoder(request.uri()).path();
        if (!path.equals("/v1") && !path.startsWith("/v1/")) {
            ctx.fireChannelRead(msg);
            return;
        }
        try {
            route(ctx, request, path);
        } catch (RuntimeException | IOException e) {
            ReferenceCountUtil.release(request);
            error(ctx, request, HttpResponseStatus.INTERNAL_SERVER_ERROR, "server_error", null,
                    "the OpenAI route failed: " + e.getClass().getSimpleName());
        }
    }

    private void route(ChannelHandlerContext ctx, FullHttpRequest request, String path) throws IOException {
        String[] parts = path.substring(1).split("/");
        if (parts.length >= 2 && parts[1].equals("models") && parts.length <= 3) {
            if (!HttpMethod.GET.equals(request.method())) {
                ReferenceCountUtil.release(request);
                error(ctx, request, HttpResponseStatus.METHOD_NOT_ALLOWED, "method_not_allowed", null,
                        request.method() + " " + path + " is not a route: use GET");
                return;
            }
            ReferenceCountUtil.release(request);
            models(ctx, request, parts.length == 3 ? parts[2] : null);
            return;
        }
        String route = null;
        if (path.equals("/v1/chat/completions")) {
            route = "chat.completions";
        } else if (path.equals("/v1/completions")) {
            route = "completions";
        } else if (path.equals("/v1/embeddings")) {
            route = "embeddings";
        }
        if (route == null) {
            ReferenceCountUtil.release(request);
            error(ctx, request, HttpResponseStatus.NOT_FOUND, "not_found", null, "no such route: " + path
                    + " (routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings)");
            return;
        }
        if (!HttpMethod.POST.equals(request.method())) {
            ReferenceCountUtil.release(request);
            error(ctx, request, HttpResponseStatus.METHOD_NOT_ALLOWED, "method_not_allowed", null,
                    request.method() + " " + path + " is not a route: use POST");
            return;
        }
        String name;
        try {
            JsonElement body = JsonParser.parseString(request.content().toString(StandardCharsets.UTF_8));
            JsonElement model = body.isJsonObject() ? body.getAsJsonObject().get("model") : null;
            name = model != null && model.isJsonPrimitive() && model.getAsJsonPrimitive().isString()
                    ? model.getAsString() : null;
        } catch (RuntimeException e) { // not JSON (Gson's JsonParseException and what it wraps)
            ReferenceCountUtil.release(request);
            error(ctx, request, HttpResponseStatus.BAD_REQUEST, "invalid_json", null,
                    "the body is not valid JSON: send a JSON object with a \"model\"");
            return;
        }
        if (name == null) {
            ReferenceCountUtil.release(request);
            error(ctx, request, HttpResponseStatus.BAD_REQUEST, "missing_model", "model",
                    "the body must be a JSON object with a string \"model\" (GET /v1/models lists them)");
            return;
        }
        Model model = ModelManager.getInstance().getDefaultModels().get(name);
        if (model == null || !speaks(model, route)) {
            ReferenceCountUtil.release(request);
            error(ctx, request, HttpResponseStatus.NOT_FOUND, "model_not_found", "model", "the model `" + name
                    + "` does not exist" + (model == null ? "" : " for " + path) + " (GET /v1/models lists them)");
            return;
        }
        request.setUri("/predictions/" + name);
        request.headers().set(ROUTE_HEADER, route);
        ctx.fireChannelRead(request);
    }

    private static JsonArray routes(Model model) throws IOException {
        File signature = new File(model.getModelDir(), OpenInferenceEndpoint.SIGNATURE);
        if (!signature.isFile()) {
            return new JsonArray();
        }
        JsonObject described =
                JsonParser.parseString(Files.readString(signature.toPath(), StandardCharsets.UTF_8)).getAsJsonObject();
        JsonElement openai = described.get("openai");
        return openai != null && openai.isJsonArray() ? openai.getAsJsonArray() : new JsonArray();
    }

    private static boolean speaks(Model model, String route) throws IOException {
        for (JsonElement r : routes(model)) {
            if (route.equals(r.getAsString())) {
                return true;
            }
        }
        return false;
    }

    private static void models(ChannelHandlerContext ctx, FullHttpRequest request, String only) throws IOException {
        JsonArray data = new JsonArray();
        for (Map.Entry<String, Model> entry : ModelManager.getInstance().getDefaultModels().entrySet()) {
            if (routes(entry.getValue()).size() == 0 || (only != null && !only.equals(entry.getKey()))) {
                continue;
            }
            JsonObject item = new JsonObject();
            item.addProperty("id", entry.getKey());
            item.addProperty("object", "model");
            item.addProperty("created", 0);
            item.addProperty("owned_by", "torchserve");
            item.add("routes", routes(entry.getValue()));
            data.add(item);
        }
        if (only != null) {
            if (data.size() == 0) {
                error(ctx, request, HttpResponseStatus.NOT_FOUND, "model_not_found", "model",
                        "the model `" + only + "` does not exist (GET /v1/models lists them)");
            } else {
                send(ctx, request, HttpResponseStatus.OK, data.get(0).getAsJsonObject());
            }
            return;
        }
        JsonObject body = new JsonObject();
        body.addProperty("object", "list");
        body.add("data", data);
        send(ctx, request, HttpResponseStatus.OK, body);
    }

    static void error(ChannelHandlerContext ctx, FullHttpRequest request, HttpResponseStatus status, String code,
            String param, String message) {
        JsonObject error = new JsonObject();
        error.addProperty("message", message);
        error.addProperty("type", status.code() >= 500 ? "server_error"
                : status.code() == 404 ? "not_found_error" : "invalid_request_error");
        error.addProperty("param", param);
        error.addProperty("code", code);
        JsonObject body = new JsonObject();
        body.add("error", error);
        send(ctx, request, status, body);
    }

    private static void send(ChannelHandlerContext ctx, FullHttpRequest request, HttpResponseStatus status,
            JsonObject body) {
        byte[] bytes = body.toString().getBytes(StandardCharsets.UTF_8);
        FullHttpResponse response =
                new DefaultFullHttpResponse(HttpVersion.HTTP_1_1, status, Unpooled.wrappedBuffer(bytes));
        response.headers().set(HttpHeaderNames.CONTENT_TYPE, HttpHeaderValues.APPLICATION_JSON);
        HttpUtil.setContentLength(response, bytes.length);
        boolean keepAlive = HttpUtil.isKeepAlive(request);
        if (keepAlive) {
            response.headers().set(HttpHeaderNames.CONNECTION, HttpHeaderValues.KEEP_ALIVE);
        }
        var future = ctx.writeAndFlush(response);
        if (!keepAlive) {
            future.addListener(ChannelFutureListener.CLOSE);
        }
    }
}
