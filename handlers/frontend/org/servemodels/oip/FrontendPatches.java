package org.servemodels.oip;

import java.io.IOException;
import java.io.InputStream;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.ProtectionDomain;
import java.util.HexFormat;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;

/**
 * A Java agent (`-javaagent:oip-endpoint.jar` in the frontend's vmargs) that substitutes our versions of six
 * TorchServe classes (handlers/frontend/patch) for its own when they load:
 *
 * <ul>
 *   <li>HttpRequestHandlerChain: keeps the request alive until a custom endpoint has answered, so endpoint plugins
 *       can read request bodies, and refuses workflow registration while enable_model_api is false (TorchServe's
 *       workflow API ignores that setting);
 *   <li>ArchiveUtils: a registration that is not a URL must name an entry of the model store, so no caller of the
 *       management APIs (REST or gRPC) can load a model from a directory elsewhere on the host.
 *   <li>ServerInitializer: puts BodyAdmission in front of each channel's aggregator, so request bodies are admitted
 *       against one budget of bytes before they are read;
 *   <li>TokenAuthorization: a key file found at start-up is kept (a restarted frontend keeps its clients' keys, a
 *       fleet seeds its replicas' keys), keys are 32 random bytes, compared in constant time;
 *   <li>GRPCInterceptor: gRPC request messages are admitted against the same byte budget (GrpcAdmission), and each
 *       call keeps its client's x-request-id and answers with its ID;
 *   <li>Session: a request's ID is the one RequestIds chose (the client's X-Request-ID when valid), printed in the
 *       access log, instead of a UUID of its own.
 * </ul>
 *
 * One more class, GRPCJob, is edited in three methods rather than substituted (MethodEdits; EDITS lists it): isOpen()
 * answers whether the call is open, and its inference constructors hand the frontend's facts of the gRPC call to the
 * job's request (GrpcAdmission.adopt).
 *
 * A class is substituted only when TorchServe's is byte for byte the one its replacement was written for
 * (TorchServe 0.12.0, whose release is final), and the agent fails closed: when a replacement is missing from the
 * jar, or TorchServe's class on the class path is not the one pinned here, premain throws, so the JVM does not
 * start, and stderr says which class and what to do. Each replacement announces itself when its class is
 * initialized (inForce); the server's readiness route answers 503 until every one has, so a frontend without its
 * patches never takes traffic (OpenInferenceEndpoint). REPLACES is the one list of the substituted classes: the
 * Makefile packs whatever handlers/frontend/patch holds, and a unit test checks that the two agree.
 */
public final class FrontendPatches {
    static final String CHAIN = "org/pytorch/serve/http/HttpRequestHandlerChain";
    static final String ARCHIVES = "org/pytorch/serve/archive/utils/ArchiveUtils";
    static final String CHANNELS = "org/pytorch/serve/ServerInitializer";
    static final String TOKENS = "org/pytorch/serve/util/TokenAuthorization";
    static final String GRPC_CALLS = "org/pytorch/serve/grpcimpl/GRPCInterceptor";
    static final String SESSIONS = "org/pytorch/serve/http/Session";
    // class -> sha256 of TorchServe 0.12.0's bytes of it
    static final Map<String, String> REPLACES = Map.of(
            CHAIN, "fb9677e4e8354e653d69114cede4a86a99da02dfd7d4f12ec2613523f1625927",
            ARCHIVES, "53a63f5dc14488648c078aa9ac2e3052884c8d9ef8198314d5faf9ede88ec1bd",
            CHANNELS, "096cdc16ec94359c5bafd0fddf4443e3d9a8c7656863d0b57bf1586fd2f8f700",
            TOKENS, "e6b5b9cedfb53c962d1c1e85b18e4143605860883395927df36565b76da59af8",
            GRPC_CALLS, "43ccf60fdede17fb9194c59ccf2304d47d94a60884a0880a91595e6e33b53292",
            SESSIONS, "08cab9ac58d796c7a9553efc84e485efd299a7d75f00860395dbdc2762613181");
    // Classes edited in one method (MethodEdits) rather than substituted, -> the sha256 of 0.12.0's bytes of them.
    // GRPCJob: isOpen() returns !isCancelled(), so ContinuousBatching keeps a gRPC stream while its client is there;
    // its inference constructors end with GrpcAdmission.adopt(request).
    static final String GRPC_JOBS = "org/pytorch/serve/job/GRPCJob";
    static final Map<String, String> EDITS = Map.of(
            GRPC_JOBS, "37d38e228b6314e854c0ab05d7488eb29ade8239683289b36d027357784058ce");
    // its isOpen()'s code in 0.12.0: aload_0; getfield #7; checkcast #65; invokevirtual #64 (isCancelled); ireturn
    static final byte[] GRPC_JOB_IS_OPEN = MethodEdits.hex("2ab40007c00041b60040ac");
    // its inference constructors' code in 0.12.0 (Job's constructor, the observer, the queue-time metric), by
    // descriptor, with the local slot of their RequestInput argument
    static final Map<String, MethodEdits.Call> GRPC_JOB_CONSTRUCTORS = Map.of(
            "(Lio/grpc/stub/StreamObserver;Ljava/lang/String;Ljava/lang/String;"
                    + "Lorg/pytorch/serve/util/messages/WorkerCommands;Lorg/pytorch/serve/util/messages/RequestInput;)V",
            new MethodEdits.Call(MethodEdits.hex("2a2c2d19041905b700012a2bb500072ab8000d1213b60015b500192a05bd001d5903"
                    + "121f535904b80021b6002653b8002ab50030b1"), 5),
            "(Lio/grpc/stub/StreamObserver;Ljava/lang/String;Ljava/lang/String;"
                    + "Lorg/pytorch/serve/util/messages/RequestInput;Lorg/pytorch/serve/util/messages/WorkerCommands;)V",
            new MethodEdits.Call(MethodEdits.hex("2a2c2d19051904b700012a2bb500342ab8000d1213b60015b500192a05bd001d5903"
                    + "121f535904b80021b6002653b8002ab50030b1"), 4));
    static final Set<String> substituted = ConcurrentHashMap.newKeySet();
    static final Set<String> announced = ConcurrentHashMap.newKeySet();

    private FrontendPatches() {}

    /** Whether the chain that lets endpoints read request bodies is in place. */
    public static boolean bodiesRetained() {
        return announced.contains(CHAIN);
    }

    /** Called from the static initializer of each replacement: its code, not TorchServe's, is the one running. */
    public static void inForce(String name) {
        if (!REPLACES.containsKey(name)) {
            throw new IllegalStateException("frontend agent: " + name + " is not a class this agent substitutes");
        }
        announced.add(name);
        System.err.println("frontend agent: our " + name + " is in force");
    }

    /** The substituted classes whose replacement has not announced itself (empty: every patch is in force). */
    public static Set<String> missing() {
        Set<String> left = new java.util.TreeSet<>(REPLACES.keySet());
        left.removeAll(announced);
        return left;
    }

    static String resource(String name) {
        return "/org/servemodels/oip/" + name.substring(name.lastIndexOf('/') + 1) + ".class.bin";
    }

    /** The bytes of the class TorchServe would load as `name`; premain throws unless their sha256 is `pinned`. */
    static byte[] pinnedClass(String name, String pinned) throws IOException {
        try (InputStream original = ClassLoader.getSystemResourceAsStream(name + ".class")) {
            byte[] bytes = original == null ? new byte[0] : original.readAllBytes();
            String digest = original == null ? "absent" : sha256(bytes);
            if (!pinned.equals(digest)) {
                throw refuse(name, "TorchServe's class has sha256 " + digest + ", not 0.12.0's " + pinned);
            }
            return bytes;
        }
    }

    public static void premain(String args, Instrumentation instrumentation) throws IOException {
        Map<String, byte[]> replacements = new ConcurrentHashMap<>();
        for (String name : REPLACES.keySet()) {
            try (InputStream stream = FrontendPatches.class.getResourceAsStream(resource(name))) {
                if (stream == null) {
                    throw refuse(name, resource(name) + " is missing from the agent's jar: rebuild it (make plugin)");
                }
                replacements.put(name, stream.readAllBytes());
            }
            pinnedClass(name, REPLACES.get(name));
        }
        for (String name : EDITS.keySet()) {
            byte[] bytes = pinnedClass(name, EDITS.get(name));
            try {
                byte[] edited = MethodEdits.negateReturn(bytes, "isOpen", GRPC_JOB_IS_OPEN);
                replacements.put(name, MethodEdits.callBeforeReturn(edited, "<init>", GRPC_JOB_CONSTRUCTORS,
                        "org/servemodels/oip/GrpcAdmission", "adopt",
                        "(Lorg/pytorch/serve/util/messages/RequestInput;)V"));
            } catch (RuntimeException e) {
                throw refuse(name, "its edit does not apply: " + e.getMessage());
            }
        }
        instrumentation.addTransformer(new ClassFileTransformer() {
            @Override
            public byte[] transform(ClassLoader loader, String name, Class<?> redefined, ProtectionDomain domain,
                    byte[] original) {
                byte[] replacement = name == null ? null : replacements.get(name);
                if (replacement == null) {
                    return null;
                }
                String digest = sha256(original);
                String pinned = REPLACES.containsKey(name) ? REPLACES.get(name) : EDITS.get(name);
                if (!pinned.equals(digest)) { // a class loaded from elsewhere than the jar checked
                    System.err.println(refuse(name, "the class loaded has sha256 " + digest).getMessage());
                    Runtime.getRuntime().halt(78);
                }
                substituted.add(name);
                if (EDITS.containsKey(name)) { // an edited class has no code of ours to announce itself with
                    System.err.println("frontend agent: our edit of " + name + " is in force");
                }
                return replacement;
            }
        });
    }

    /** Why the frontend does not start, and what to do: the error premain throws. */
    static IllegalStateException refuse(String name, String why) {
        return new IllegalStateException("frontend agent: cannot substitute " + name + ": " + why + ". The frontend "
                + "does not start without its patches (byte budget, key checks, model-store restriction). Serve with "
                + "TorchServe 0.12.0 as requirements/ pin it, or re-derive the patch for this TorchServe "
                + "(docs/protocols.md, \"The frontend agent\") and pin its class's new sha256 in FrontendPatches.");
    }

    static String sha256(byte[] bytes) {
        try {
            return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(bytes));
        } catch (NoSuchAlgorithmException e) {
            return "";
        }
    }
}
