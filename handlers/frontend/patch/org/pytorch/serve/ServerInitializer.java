package org.pytorch.serve;

import io.netty.channel.Channel;
import io.netty.channel.ChannelInitializer;
import io.netty.channel.ChannelPipeline;
import io.netty.channel.WriteBufferWaterMark;
import io.netty.handler.codec.http.HttpObjectAggregator;
import io.netty.handler.codec.http.HttpServerCodec;
import io.netty.handler.ssl.SslContext;
import io.netty.handler.timeout.IdleStateHandler;
import java.util.concurrent.TimeUnit;
import org.pytorch.serve.http.ExtendedSSLHandler;
import org.pytorch.serve.http.HttpRequestHandler;
import org.pytorch.serve.http.HttpRequestHandlerChain;
import org.pytorch.serve.http.InvalidRequestHandler;
import org.pytorch.serve.http.TokenAuthorizationHandler;
import org.pytorch.serve.http.api.rest.ApiDescriptionRequestHandler;
import org.pytorch.serve.http.api.rest.InferenceRequestHandler;
import org.pytorch.serve.http.api.rest.ManagementRequestHandler;
import org.pytorch.serve.http.api.rest.OpenInferenceProtocolRequestHandler;
import org.pytorch.serve.http.api.rest.PrometheusMetricsRequestHandler;
import org.pytorch.serve.servingsdk.impl.PluginsManager;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.ConnectorType;
import org.pytorch.serve.util.TokenAuthorization.TokenType;
import org.pytorch.serve.workflow.api.http.WorkflowInferenceRequestHandler;
import org.pytorch.serve.workflow.api.http.WorkflowMgmtRequestHandler;
import org.servemodels.oip.BodyAdmission;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * TorchServe 0.12's channel set-up, with one handler more: org.servemodels.oip.BodyAdmission sits between the
 * HTTP codec and the aggregator, so a request without its port's key, or whose body would take the bytes that the
 * server holds for request bodies past their budget, is refused from its headers, before its body is read into
 * memory. An idle-read timer in front of the codec lets it drop a body that stops arriving, and each channel's
 * outbound buffer has a high water mark past which it stops being read (WRITE_HIGH). The handler chain
 * behind it is TorchServe's, built in the same order, with the OpenAI API's routes (org.servemodels.oip.OpenAiRoutes) in
 * front of it on the inference port, org.servemodels.oip.StreamEnd, which ends a streamed answer that fails
 * midway with an error chunk in the stream's own form, and org.servemodels.oip.RequestFacts, which tells the handler a
 * prediction's query parameters (TorchServe drops them on /predictions) and when the request arrived; right behind the
 * codec, org.servemodels.oip.RequestIds gives each request of every port its ID and each answer its X-Request-ID,
 * and, when the environment names an OpenTelemetry collector, org.servemodels.oip.RequestTraces records the
 * frontend's span of each inference request. Substituted for TorchServe's class at start-up by
 * org.servemodels.oip.FrontendPatches, only when that class's bytes are the 0.12.0 release's.
 */
public class ServerInitializer extends ChannelInitializer<Channel> {
    static {
        org.servemodels.oip.FrontendPatches.inForce("org/pytorch/serve/ServerInitializer");
    }

    private static final Logger logger = LoggerFactory.getLogger(ServerInitializer.class);
    // bytes of answers queued on one connection past which it is not read until they drain (and back below LOW)
    static final int WRITE_LOW = 256 << 10;
    static final int WRITE_HIGH = 1 << 20;
    private ConnectorType connectorType;
    private SslContext sslCtx;

    public ServerInitializer(SslContext sslCtx, ConnectorType type) {
        this.sslCtx = sslCtx;
        this.connectorType = type;
    }

    @Override
    public void initChannel(Channel ch) {
        ChannelPipeline pipeline = ch.pipeline();
        ConfigManager config = ConfigManager.getInstance();
        if (sslCtx != null) {
            pipeline.addLast("ssl", new ExtendedSSLHandler(sslCtx, connectorType));
        }
        ch.config().setWriteBufferWaterMark(new WriteBufferWaterMark(WRITE_LOW, WRITE_HIGH));
        pipeline.addLast("idle", new IdleStateHandler(BodyAdmission.readTimeoutSeconds(), 0, 0, TimeUnit.SECONDS));
        pipeline.addLast("http", new HttpServerCodec());
        pipeline.addLast("ids", new org.servemodels.oip.RequestIds());
        boolean inference = ConnectorType.ALL.equals(connectorType) || ConnectorType.INFERENCE_CONNECTOR.equals(connectorType);
        if (inference && org.servemodels.oip.RequestTraces.enabled()) {
            pipeline.addLast("traces", new org.servemodels.oip.RequestTraces());
        }
        pipeline.addLast("admission", new BodyAdmission(connectorType));
        pipeline.addLast("aggregator", new HttpObjectAggregator(config.getMaxRequestSize()));
        if (inference) {
            pipeline.addLast("stream-end", new org.servemodels.oip.StreamEnd());
            pipeline.addLast("facts", new org.servemodels.oip.RequestFacts());
            pipeline.addLast("openai", new org.servemodels.oip.OpenAiRoutes());
        }

        HttpRequestHandlerChain head = new ApiDescriptionRequestHandler(connectorType);
        HttpRequestHandlerChain last = head;
        boolean all = ConnectorType.ALL.equals(connectorType);
        if (all || ConnectorType.INFERENCE_CONNECTOR.equals(connectorType)) {
            last = last.setNextHandler(new TokenAuthorizationHandler(TokenType.INFERENCE));
            last = last.setNextHandler(new InferenceRequestHandler(PluginsManager.getInstance().getInferenceEndpoints()));
            last = last.setNextHandler(new WorkflowInferenceRequestHandler());
            if (config.isOpenInferenceProtocol()) {
                logger.info("OIP added with handler chain");
                last = last.setNextHandler(new OpenInferenceProtocolRequestHandler());
            }
        }
        if (all || ConnectorType.MANAGEMENT_CONNECTOR.equals(connectorType)) {
            last = last.setNextHandler(new TokenAuthorizationHandler(TokenType.MANAGEMENT));
            last = last.setNextHandler(
                    new ManagementRequestHandler(PluginsManager.getInstance().getManagementEndpoints()));
            last = last.setNextHandler(new WorkflowMgmtRequestHandler());
        }
        if (config.isMetricApiEnable() && all || ConnectorType.METRICS_CONNECTOR.equals(connectorType)) {
            last = last.setNextHandler(new PrometheusMetricsRequestHandler());
        }
        last.setNextHandler(new InvalidRequestHandler());
        pipeline.addLast("handler", new HttpRequestHandler(head));
    }
}
