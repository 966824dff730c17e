package org.servemodels.oip;

import java.io.IOException;
import java.io.InputStream;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.ProtectionDomain;
import java.util.HexFormat;

/**
 * A Java agent (`-javaagent:oip-endpoint.jar` in the frontend's vmargs) that lets frontend plugins read request
 * bodies: it substitutes our HttpRequestHandlerChain (handlers/frontend/patch), which keeps the request alive
 * until a custom endpoint has answered, for TorchServe's own when that class loads. It substitutes nothing
 * unless TorchServe's class is byte for byte the one it was written for (TorchServe 0.12.0, whose release is
 * final); otherwise it says so on stderr and OpenInferenceEndpoint answers infer requests with a 501.
 */
public final class BodyRetention {
    static final String TARGET = "org/pytorch/serve/http/HttpRequestHandlerChain";
    static final String REPLACES_SHA256 = "fb9677e4e8354e653d69114cede4a86a99da02dfd7d4f12ec2613523f1625927";
    static final String REPLACEMENT = "/org/servemodels/oip/HttpRequestHandlerChain.class.bin";
    static volatile boolean active;

    private BodyRetention() {}

    public static boolean active() {
        return active;
    }

    public static void premain(String args, Instrumentation instrumentation) throws IOException {
        byte[] replacement;
        try (InputStream stream = BodyRetention.class.getResourceAsStream(REPLACEMENT)) {
            if (stream == null) {
                System.err.println("oip-endpoint agent: " + REPLACEMENT + " is missing from the jar; nothing changed");
                return;
            }
            replacement = stream.readAllBytes();
        }
        instrumentation.addTransformer(new ClassFileTransformer() {
            @Override
            public byte[] transform(ClassLoader loader, String name, Class<?> redefined, ProtectionDomain domain,
                    byte[] original) {
                if (!TARGET.equals(name)) {
                    return null;
                }
                String digest = sha256(original);
                if (!REPLACES_SHA256.equals(digest)) {
                    System.err.println("oip-endpoint agent: " + name + " has sha256 " + digest + ", not TorchServe "
                            + "0.12.0's; left as it is (infer over the plugin's /v2 routes answers 501)");
                    return null;
                }
                active = true;
                return replacement;
            }
        });
    }

    static String sha256(byte[] bytes) {
        try {
            return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(bytes));
        } catch (NoSuchAlgorithmException e) {
            return "";
        }
    }
}
