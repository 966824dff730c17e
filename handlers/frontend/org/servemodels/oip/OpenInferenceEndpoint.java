package org.servemodels.oip;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpUtil;
import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.lang.reflect.Field;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.pytorch.serve.job.RestJob;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.messages.InputParameter;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.util.messages.WorkerCommands;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkerState;
import org.pytorch.serve.wlm.WorkerThread;

/**
 * The Open Inference Protocol's REST routes that TorchServe 0.12 lacks, on its own inference port, behind its
 * own token authorization (this endpoint runs after it, like every inference route):
 *
 * <pre>
 *   GET  /v2                                          server metadata
 *   GET  /v2/health/live | /v2/health/ready           live; ready while every model has a READY worker (and which)
 *                                                    and `make serve` is building none ("building": which)
 *   GET  /v2/models/{m}[/versions/{v}]                model metadata: name, versions, platform, inputs, outputs
 *   GET  /v2/models/{m}[/versions/{v}]/ready          ready while that model (version) has a READY worker
 *   POST /v2/models/{m}[/versions/{v}]/infer          the handler, as TorchServe's own infer route does it
 * </pre>
 *
 * TorchServe hands an endpoint named "v2" every path under /v2, the infer route included, so this endpoint
 * queues infer requests itself: the same job TorchServe makes (a RestJob, so batching, the queue and its
 * latency metrics are TorchServe's own), with the body, its media type and every header, answered with the
 * handler's status, headers and body. What a model takes and gives comes from `signature.json`, which the
 * archive step writes from the model's kind (handlers/kinds) and packs beside the handler.
 */
@Endpoint(
        urlPattern = "v2",
        endpointType = EndpointTypes.INFERENCE,
        description = "Open Inference Protocol: metadata, readiness and infer")
public class OpenInferenceEndpoint extends ModelServerEndpoint {

    static final String SIGNATURE = "signature.json";

    @Override
    public void doGet(Request req, Response rsp, Context context) throws IOException {
        String[] path = segments(req);
        if (path.length == 0) {
            JsonObject body = new JsonObject();
            body.addProperty("name", "torchserve");
            body.addProperty("version", ConfigManager.getInstance().getVersion());
            JsonArray extensions = new JsonArray();
            extensions.add("model_metadata");
            extensions.add("model_ready");
            extensions.add("binary_tensor_data");
            body.add("extensions", extensions);
            json(rsp, 200, body);
        } else if (path.length == 2 && path[0].equals("health") && path[1].equals("live")) {
            JsonObject body = new JsonObject();
            body.addProperty("live", true);
            json(rsp, 200, body);
        } else if (path.length == 2 && path[0].equals("health") && path[1].equals("ready")) {
            // The readiness of the whole server, defined here once (serve_config/control/probe.py asks it, and so
            // does the fleet's HAProxy): at least one model, and each default version has a loaded worker.
            // "models" says which, beyond the OIP's "ready".
            // A frontend without every patch of its agent in force never reports ready (FrontendPatches).
            java.util.Set<String> unpatched = FrontendPatches.missing();
            boolean ready = !ModelManager.getInstance().getDefaultModels().isEmpty() && unpatched.isEmpty();
            JsonObject models = new JsonObject();
            for (Model model : ModelManager.getInstance().getDefaultModels().values()) {
                boolean loaded = hasReadyWorker(model);
                models.addProperty(model.getModelName(), loaded);
                ready &= loaded;
            }
            // Models `make serve` is still building are not served yet: the server is not ready until they are.
            List<String> building = Settings.building();
            ready &= building.isEmpty();
            JsonObject body = new JsonObject();
            body.addProperty("ready", ready);
            body.add("models", models);
            if (!building.isEmpty()) {
                JsonArray names = new JsonArray();
                building.forEach(names::add);
                body.add("building", names);
            }
            if (!unpatched.isEmpty()) {
                body.addProperty("unpatched", String.join(", ", unpatched));
            }
            json(rsp, ready ? 200 : 503, body);
        } else {
            Target target = Target.parse(path);
            if (target == null || (target.action != null && !target.action.equals("ready"))) {
                error(rsp, 404, "no such route: GET " + req.getRequestURI());
                return;
            }
            Model model = target.model();
            if (model == null) {
                error(rsp, 404, target.missing());
            } else if ("ready".equals(target.action)) {
                boolean ready = hasReadyWorker(model);
                JsonObject body = new JsonObject();
                body.addProperty("name", model.getModelName());
                body.addProperty("version", model.getVersion());
                body.addProperty("ready", ready);
                json(rsp, ready ? 200 : 503, body);
            } else {
                metadata(rsp, model);
            }
        }
    }

    @Override
    public void doPost(Request req, Response rsp, Context context) throws IOException {
        Target target = Target.parse(segments(req));
        if (target == null || !"infer".equals(target.action)) {
            error(rsp, 404, "no such route: POST " + req.getRequestURI());
            return;
        }
        Model model = target.model();
        if (model == null) {
            error(rsp, 404, target.missing());
            return;
        }
        infer(req, rsp, model, target.version);
    }

    @Override
    public void doPut(Request req, Response rsp, Context context) throws IOException {
        error(rsp, 405, "method not allowed: PUT " + req.getRequestURI());
    }

    @Override
    public void doDelete(Request req, Response rsp, Context context) throws IOException {
        error(rsp, 405, "method not allowed: DELETE " + req.getRequestURI());
    }

    /** The path's segments after /v2, without a query string or empty segments. */
    static String[] segments(Request req) {
        String uri = req.getRequestURI();
        int query = uri.indexOf('?');
        if (query >= 0) {
            uri = uri.substring(0, query);
        }
        List<String> parts = new ArrayList<>();
        for (String part : uri.split("/")) {
            if (!part.isEmpty()) {
                parts.add(part);
            }
        }
        if (parts.isEmpty() || !parts.get(0).equals("v2")) {
            return new String[] {"-"};
        }
        return parts.subList(1, parts.size()).toArray(new String[0]);
    }

    /** models/{m}[/versions/{v}][/{action}] */
    static final class Target {
        final String name;
        final String version;
        final String action;

        Target(String name, String version, String action) {
            this.name = name;
            this.version = version;
            this.action = action;
        }

        static Target parse(String[] path) {
            if (path.length < 2 || !path[0].equals("models")) {
                return null;
            }
            String version = null;
            int next = 2;
            if (path.length >= 4 && path[2].equals("versions")) {
                version = path[3];
                next = 4;
            }
            if (path.length == next) {
                return new Target(path[1], version, null);
            }
            if (path.length == next + 1) {
                return new Target(path[1], version, path[next]);
            }
            return null;
        }

        Model model() {
            try {
                return ModelManager.getInstance().getModel(name, version);
            } catch (Exception e) {
                return null;
            }
        }

        String missing() {
            return version == null
                    ? "model " + name + " is not served"
                    : "model " + name + " version " + version + " is not served";
        }
    }

    static boolean hasReadyWorker(Model model) {
        for (WorkerThread worker : ModelManager.getInstance().getWorkers(model.getModelVersionName())) {
            if (worker.getState() == WorkerState.WORKER_MODEL_LOADED) {
                return true;
            }
        }
        return false;
    }

    static void metadata(Response rsp, Model model) throws IOException {
        File signature = new File(model.getModelDir(), SIGNATURE);
        if (!signature.isFile()) {
            error(rsp, 404, "model " + model.getModelName() + " has no " + SIGNATURE + " in its archive: "
                    + "rebuild it with `make archive MODEL=" + model.getModelName() + "`");
            return;
        }
        JsonObject described =
                JsonParser.parseString(Files.readString(signature.toPath(), StandardCharsets.UTF_8))
                        .getAsJsonObject();
        JsonObject body = new JsonObject();
        body.addProperty("name", model.getModelName());
        JsonArray versions = new JsonArray();
        try {
            for (Map.Entry<String, Model> entry :
                    ModelManager.getInstance().getAllModelVersions(model.getModelName())) {
                versions.add(entry.getKey());
            }
        } catch (Exception e) {
            versions.add(model.getVersion());
        }
        body.add("versions", versions);
        for (String key : new String[] {"platform", "inputs", "outputs", "parameters"}) {
            JsonElement value = described.get(key);
            if (value != null) {
                body.add(key, value);
            }
        }
        json(rsp, 200, body);
    }

    /** The job TorchServe's own routes queue, answered through a promise instead of a channel. */
    static final class EndpointJob extends RestJob {
        volatile int status = 500;
        volatile String phrase;
        volatile CharSequence contentType;
        volatile Map<String, String> headers;

        EndpointJob(String model, String version, RequestInput input) {
            super(null, model, version, WorkerCommands.PREDICT, input);
            setResponsePromise(new CompletableFuture<>());
        }

        @Override
        public void response(byte[] body, CharSequence type, int code, String statusPhrase,
                Map<String, String> responseHeaders) {
            status = code;
            phrase = statusPhrase;
            contentType = type;
            headers = responseHeaders;
            super.response(body, type, code, statusPhrase, responseHeaders);
        }

        @Override
        public void sendError(int code, String error) {
            status = code;
            super.sendError(code, error);
        }

        @Override
        public boolean isOpen() {
            return true;
        }
    }

    static void infer(Request req, Response rsp, Model model, String version) throws IOException {
        if (!FrontendPatches.bodiesRetained()) {
            error(rsp, 501, "this frontend cannot read request bodies in endpoint plugins (the oip-endpoint agent "
                    + "is not active: see the server's stderr); infer is not served at this route");
            return;
        }
        RequestInput input = new RequestInput(UUID.randomUUID().toString());
        FullHttpRequest http = nettyRequest(req);
        if (http != null) {
            for (Map.Entry<String, String> header : http.headers().entries()) {
                input.updateHeaders(header.getKey(), header.getValue());
            }
        }
        byte[] content;
        try (InputStream stream = req.getInputStream()) {
            content = stream.readAllBytes();
        }
        // the body's media type as TorchServe's own routes take it (none, when the client sent none)
        CharSequence type = http == null ? null : HttpUtil.getMimeType(http);
        input.addParameter(new InputParameter("body", content, type));
        EndpointJob job = new EndpointJob(model.getModelName(), version, input);
        boolean queued;
        try {
            queued = ModelManager.getInstance().addJob(job);
        } catch (Exception e) {
            error(rsp, 404, "model " + model.getModelName() + " is not served");
            return;
        }
        if (!queued) {
            error(rsp, 503, "model " + model.getModelName() + " has no worker to serve the request, or its queue "
                    + "is full");
            return;
        }
        long timeout = ConfigManager.getInstance().getDefaultResponseTimeout() * 2L + 30L;
        byte[] answer;
        try {
            answer = job.getResponsePromise().get(timeout, TimeUnit.SECONDS);
        } catch (ExecutionException e) {
            int status = job.status >= 400 ? job.status : 500;
            error(rsp, status, e.getCause() == null ? "inference failed" : e.getCause().getMessage());
            return;
        } catch (TimeoutException e) {
            error(rsp, 504, "no answer from the model within " + timeout + " s");
            return;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            error(rsp, 503, "interrupted");
            return;
        }
        if (job.phrase != null) {
            rsp.setStatus(job.status, job.phrase);
        } else {
            rsp.setStatus(job.status);
        }
        if (job.headers != null) {
            for (Map.Entry<String, String> header : job.headers.entrySet()) {
                rsp.setHeader(header.getKey(), header.getValue());
            }
        }
        rsp.setContentType(job.contentType != null && job.contentType.length() > 0
                ? job.contentType.toString() : "application/json");
        rsp.setHeader("Content-Length", Integer.toString(answer.length));
        rsp.getOutputStream().write(answer);
    }

    /** The Netty request behind the SDK's request (its headers; the SDK gives only their names). */
    static FullHttpRequest nettyRequest(Request req) {
        try {
            Field field = req.getClass().getDeclaredField("req");
            field.setAccessible(true);
            return (FullHttpRequest) field.get(req);
        } catch (ReflectiveOperationException | ClassCastException e) {
            return null;
        }
    }

    static void json(Response rsp, int status, JsonObject body) throws IOException {
        byte[] bytes = (body.toString() + "\n").getBytes(StandardCharsets.UTF_8);
        rsp.setStatus(status);
        rsp.setContentType("application/json");
        rsp.setHeader("Content-Length", Integer.toString(bytes.length));
        rsp.getOutputStream().write(bytes);
    }

    static void error(Response rsp, int status, String message) throws IOException {
        JsonObject body = new JsonObject();
        body.addProperty("error", message);
        json(rsp, status, body);
    }
}
