package org.pytorch.serve.grpcimpl;

import io.grpc.Grpc;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.Status;
import org.pytorch.serve.http.Session;
import org.pytorch.serve.util.ConnectorType;
import org.pytorch.serve.util.TokenAuthorization;
import org.pytorch.serve.util.TokenAuthorization.TokenType;
import org.servemodels.oip.GrpcAdmission;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * TorchServe 0.12.0's GRPCInterceptor (token check and access log of each gRPC call), with every request message
 * admitted against the frontend's byte budget (org.servemodels.oip.GrpcAdmission), and the call's request ID taken
 * from its x-request-id metadata when valid (org.servemodels.oip.RequestIds), answered in its headers or trailers. Substituted for TorchServe's
 * by the frontend agent (FrontendPatches). No switch on an enum and no anonymous class here: either would compile
 * to a class file of its own, and only this one is substituted.
 */
public class GRPCInterceptor implements ServerInterceptor {
    static {
        org.servemodels.oip.FrontendPatches.inForce("org/pytorch/serve/grpcimpl/GRPCInterceptor");
    }


    private TokenType tokenType;
    private static final Metadata.Key<String> tokenAuthHeaderKey =
            Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
    private static final Logger logger = LoggerFactory.getLogger("ACCESS_LOG");

    public GRPCInterceptor(ConnectorType connectorType) {
        tokenType = connectorType == ConnectorType.MANAGEMENT_CONNECTOR ? TokenType.MANAGEMENT : TokenType.INFERENCE;
    }

    @Override
    public <ReqT, RespT> ServerCall.Listener<ReqT> interceptCall(
            ServerCall<ReqT, RespT> call, Metadata headers, ServerCallHandler<ReqT, RespT> next) {
        String inetSocketString = call.getAttributes().get(Grpc.TRANSPORT_ATTR_REMOTE_ADDR).toString();
        String serviceName = call.getMethodDescriptor().getFullMethodName();
        Session session = new Session(inetSocketString, serviceName, headers.get(GrpcAdmission.ID_KEY));

        if (TokenAuthorization.isEnabled()) {
            if (!headers.containsKey(tokenAuthHeaderKey)
                    || !checkTokenAuthorization(headers.get(tokenAuthHeaderKey))) {
                Metadata trailers = new Metadata();
                trailers.put(GrpcAdmission.ID_KEY, session.chosenId());
                call.close(
                        Status.PERMISSION_DENIED.withDescription(
                                "Token Authorization failed. Token either incorrect, expired, or not provided correctly"),
                        trailers);
                return GrpcAdmission.nothing();
            }
        }
        return GrpcAdmission.start(call, headers, next, session, session.chosenId(), logger);
    }

    private Boolean checkTokenAuthorization(String tokenAuthHeaderValue) {
        if (tokenAuthHeaderValue == null) {
            return false;
        }
        String token = TokenAuthorization.parseTokenFromBearerTokenHeader(tokenAuthHeaderValue);

        return TokenAuthorization.checkTokenAuthorization(token, tokenType);
    }
}
