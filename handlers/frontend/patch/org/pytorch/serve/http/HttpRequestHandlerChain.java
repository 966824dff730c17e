package org.pytorch.serve.http;

import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.DefaultFullHttpResponse;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.handler.codec.http.QueryStringDecoder;
import java.io.IOException;
import java.util.Map;
import java.util.concurrent.Semaphore;
import org.pytorch.serve.archive.DownloadArchiveException;
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.archive.model.ModelNotFoundException;
import org.pytorch.serve.archive.workflow.WorkflowException;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.ModelServerEndpointException;
import org.pytorch.serve.servingsdk.impl.ModelServerContext;
import org.pytorch.serve.servingsdk.impl.ModelServerRequest;
import org.pytorch.serve.servingsdk.impl.ModelServerResponse;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.NettyUtils;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkerInitializationException;
import org.pytorch.serve.http.api.rest.InferenceRequestHandler;
import org.pytorch.serve.workflow.api.http.WorkflowInferenceRequestHandler;
import org.pytorch.serve.workflow.api.http.WorkflowMgmtRequestHandler;
import org.servemodels.oip.FormFieldGate;
import org.servemodels.oip.WorkflowApiGate;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * TorchServe 0.12's request handler chain, with three differences:
 *
 * <ul>
 *   <li>a custom endpoint (a frontend plugin) runs on a task after Netty has released the request, so it could
 *       never read a request body. This chain holds a retained duplicate of the request for the task and releases
 *       it when the endpoint has answered;
 *   <li>the workflow management handler is reached through org.servemodels.oip.WorkflowApiGate, which applies
 *       enable_model_api to workflows as TorchServe does to models, and the inference handlers through
 *       org.servemodels.oip.FormFieldGate, which refuses form bodies of too many fields before they are expanded.
 * </ul>
 *
 * And the endpoint tasks, which TorchServe runs on its unbounded thread pool and which hold a thread while an infer
 * request waits for its answer, are bounded: at most max_endpoint_tasks at once, 503 past that.
 *
 * Everything else keeps TorchServe's members and behaviour, so the classes that extend it load unchanged.
 * Substituted for TorchServe's own class at start-up by org.servemodels.oip.FrontendPatches (a Java agent), only
 * when that class's bytes are the 0.12.0 release's.
 */
public abstract class HttpRequestHandlerChain {
    static {
        org.servemodels.oip.FrontendPatches.inForce("org/pytorch/serve/http/HttpRequestHandlerChain");
    }

    private static final Logger logger = LoggerFactory.getLogger(HttpRequestHandlerChain.class);
    // Endpoint tasks run on TorchServe's cached (unbounded) thread pool, and an infer request's task waits there for
    // its answer: at most max_endpoint_tasks of them at once (256 unless set); past that, 503 at once.
    private static volatile Semaphore endpointTasks;
    protected Map<String, ModelServerEndpoint> endpointMap;
    protected HttpRequestHandlerChain chain;

    public HttpRequestHandlerChain() {}

    public HttpRequestHandlerChain(Map<String, ModelServerEndpoint> endpoints) {
        endpointMap = endpoints;
    }

    public HttpRequestHandlerChain setNextHandler(HttpRequestHandlerChain next) {
        if (next instanceof WorkflowMgmtRequestHandler) {
            chain = new WorkflowApiGate(next);
        } else if (next instanceof InferenceRequestHandler || next instanceof WorkflowInferenceRequestHandler) {
            chain = new FormFieldGate(next);
        } else {
            chain = next;
        }
        return next; // the caller goes on chaining from TorchServe's handler, as before
    }

    public abstract void handleRequest(
            ChannelHandlerContext ctx, FullHttpRequest req, QueryStringDecoder decoder, String[] segments)
            throws ModelNotFoundException, ModelException, DownloadArchiveException, WorkflowException,
                    WorkerInitializationException;

    private void run(ModelServerEndpoint endpoint, FullHttpRequest req, FullHttpResponse rsp,
            QueryStringDecoder decoder, String method) throws IOException {
        ModelServerRequest request = new ModelServerRequest(req, decoder);
        ModelServerResponse response = new ModelServerResponse(rsp);
        ModelServerContext context = new ModelServerContext();
        if ("GET".equals(method)) {
            endpoint.doGet(request, response, context);
        } else if ("PUT".equals(method)) {
            endpoint.doPut(request, response, context);
        } else if ("DELETE".equals(method)) {
            endpoint.doDelete(request, response, context);
        } else if ("POST".equals(method)) {
            endpoint.doPost(request, response, context);
        } else {
            throw new ServiceUnavailableException("Invalid HTTP method received");
        }
    }

    protected void handleCustomEndpoint(
            ChannelHandlerContext ctx, FullHttpRequest req, String[] segments, QueryStringDecoder decoder) {
        ModelServerEndpoint endpoint = endpointMap.get(segments[1]);
        Semaphore tasks = endpointTasks();
        if (!tasks.tryAcquire()) {
            NettyUtils.sendError(ctx, HttpResponseStatus.SERVICE_UNAVAILABLE, new IllegalStateException(
                    "the server runs max_endpoint_tasks requests of its endpoint plugins already; retry with backoff"));
            return;
        }
        FullHttpRequest held = req.retainedDuplicate(); // the body outlives the channel handler's release
        Runnable task = () -> {
            long start = System.currentTimeMillis();
            FullHttpResponse rsp = new DefaultFullHttpResponse(HttpVersion.HTTP_1_1, HttpResponseStatus.OK, false);
            try {
                run(endpoint, held, rsp, decoder, held.method().toString());
                NettyUtils.sendHttpResponse(ctx, rsp, true);
                logger.info("Running \"{}\" endpoint took {} ms", segments[1], System.currentTimeMillis() - start);
            } catch (ModelServerEndpointException e) {
                NettyUtils.sendError(ctx, HttpResponseStatus.INTERNAL_SERVER_ERROR, e);
                logger.error("Error thrown by the model endpoint plugin.", e);
            } catch (OutOfMemoryError e) {
                NettyUtils.sendError(ctx, HttpResponseStatus.INSUFFICIENT_STORAGE, e, "Out of memory");
            } catch (IOException e) {
                NettyUtils.sendError(ctx, HttpResponseStatus.INTERNAL_SERVER_ERROR, e,
                        "I/O error while running the custom endpoint");
                logger.error("I/O error while running the custom endpoint.", e);
            } catch (Throwable e) {
                NettyUtils.sendError(ctx, HttpResponseStatus.INTERNAL_SERVER_ERROR, e, "Unknown exception");
                logger.error("Unknown exception", e);
            } finally {
                held.release();
                tasks.release();
            }
        };
        try {
            ModelManager.getInstance().submitTask(task);
        } catch (RuntimeException e) {
            held.release();
            tasks.release();
            throw e;
        }
    }

    private static Semaphore endpointTasks() {
        if (endpointTasks == null) {
            int permits = 256;
            try {
                permits = Integer.parseInt(ConfigManager.getInstance().getProperty("max_endpoint_tasks", "256").trim());
            } catch (NumberFormatException e) {
                logger.error("max_endpoint_tasks is not a whole number; using 256");
            }
            endpointTasks = new Semaphore(Math.max(1, permits));
        }
        return endpointTasks;
    }
}
