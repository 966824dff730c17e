package org.servemodels.oip;

import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpMethod;
import io.netty.handler.codec.http.QueryStringDecoder;
import org.pytorch.serve.archive.DownloadArchiveException;
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.archive.workflow.WorkflowException;
import org.pytorch.serve.http.HttpRequestHandlerChain;
import org.pytorch.serve.http.MethodNotAllowedException;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.wlm.WorkerInitializationException;

/**
 * Put in front of TorchServe's workflow management handler by our HttpRequestHandlerChain: registering or
 * unregistering a workflow is refused (405, as for models) while enable_model_api is false. TorchServe 0.12
 * checks that setting for models only, and a workflow registers models and handler code of its own.
 */
public final class WorkflowApiGate extends HttpRequestHandlerChain {
    private final HttpRequestHandlerChain workflows;

    public WorkflowApiGate(HttpRequestHandlerChain workflows) {
        this.workflows = workflows;
    }

    @Override
    public void handleRequest(ChannelHandlerContext ctx, FullHttpRequest req, QueryStringDecoder decoder,
            String[] segments) throws ModelException, DownloadArchiveException, WorkflowException,
                    WorkerInitializationException {
        boolean changes = HttpMethod.POST.equals(req.method()) || HttpMethod.DELETE.equals(req.method());
        if (changes && segments.length >= 2 && "workflows".equals(segments[1])
                && !ConfigManager.getInstance().isModelApiEnabled()) {
            throw new MethodNotAllowedException();
        }
        workflows.handleRequest(ctx, req, decoder, segments);
    }
}
