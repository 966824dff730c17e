package org.pytorch.serve.util;

import com.google.gson.GsonBuilder;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.attribute.PosixFilePermissions;
import java.security.MessageDigest;
import java.security.SecureRandom;
import java.time.Instant;
import java.util.Base64;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * TorchServe 0.12's token authorization, with the same members and three differences:
 *
 * <ul>
 *   <li>a key file already in the working directory when the frontend starts is taken as it is (its keys, new
 *       expiry times), so a frontend restarted by the supervisor keeps its clients' keys, and a fleet can give
 *       its replicas the keys its balancer sends; with no such file, keys are made as before;
 *   <li>a key is 32 random bytes, not 6;
 *   <li>keys are compared in constant time.
 * </ul>
 *
 * Substituted for TorchServe's class at start-up by org.servemodels.oip.FrontendPatches, only when that class's
 * bytes are the 0.12.0 release's. (No switch over TokenType here: that would need a synthetic class the jar does
 * not hold.)
 */
public class TokenAuthorization {
    static {
        org.servemodels.oip.FrontendPatches.inForce("org/pytorch/serve/util/TokenAuthorization");
    }

    private static String apiKey;
    private static String managementKey;
    private static String inferenceKey;
    private static Instant managementExpirationTimeMinutes;
    private static Instant inferenceExpirationTimeMinutes;
    private static Boolean tokenAuthEnabled;
    private static String keyFilePath;
    private static final SecureRandom secureRandom = new SecureRandom();
    private static final Base64.Encoder baseEncoder = Base64.getUrlEncoder().withoutPadding();
    private static final Pattern bearerTokenHeaderPattern = Pattern.compile("^Bearer\\s+(\\S+)$");
    private static final Logger logger = LoggerFactory.getLogger(TokenAuthorization.class);

    public enum TokenType {
        INFERENCE,
        MANAGEMENT,
        TOKEN_API
    }

    public static void init() {
        if (ConfigManager.getInstance().getDisableTokenAuthorization()) {
            tokenAuthEnabled = false;
            return;
        }
        tokenAuthEnabled = true;
        keyFilePath = Paths.get(System.getProperty("user.dir"), "key_file.json").toString();
        try {
            if (readKeyFile()) {
                logger.info("Token authorization: keys taken from " + keyFilePath);
            } else {
                apiKey = generateKey();
                generateKeyFile(TokenType.TOKEN_API);
                logger.info("Token authorization: new keys in " + keyFilePath);
            }
            inferenceExpirationTimeMinutes = generateTokenExpiration();
            managementExpirationTimeMinutes = generateTokenExpiration();
            writeKeyFile();
        } catch (IOException e) {
            logger.error("Token Authorization setup unsuccessful", e);
            throw new IllegalStateException("Token Authorization setup unsuccessful", e);
        }
    }

    public static Boolean isEnabled() {
        return tokenAuthEnabled;
    }

    public static String updateKeyFile(TokenType tokenType) throws IOException {
        if (tokenType == TokenType.MANAGEMENT || tokenType == TokenType.INFERENCE) {
            generateKeyFile(tokenType);
            return "";
        }
        return "{\n\t\"Error\": " + tokenType + "\n}\n";
    }

    public static boolean checkTokenAuthorization(String token, TokenType tokenType) {
        String key = inferenceKey;
        Instant expiration = inferenceExpirationTimeMinutes;
        if (tokenType == TokenType.TOKEN_API) {
            key = apiKey;
            expiration = null;
        } else if (tokenType == TokenType.MANAGEMENT) {
            key = managementKey;
            expiration = managementExpirationTimeMinutes;
        }
        if (token == null || key == null || !MessageDigest.isEqual(
                token.getBytes(StandardCharsets.UTF_8), key.getBytes(StandardCharsets.UTF_8))) {
            return false;
        }
        return expiration == null || !isTokenExpired(expiration);
    }

    public static String parseTokenFromBearerTokenHeader(String bearerTokenHeader) {
        Matcher matcher = bearerTokenHeaderPattern.matcher(bearerTokenHeader);
        return matcher.matches() ? matcher.group(1) : "";
    }

    private static String generateKey() {
        byte[] randomBytes = new byte[32];
        secureRandom.nextBytes(randomBytes);
        return baseEncoder.encodeToString(randomBytes);
    }

    private static Instant generateTokenExpiration() {
        long secondsToAdd = (long) (ConfigManager.getInstance().getTimeToExpiration() * 60);
        return Instant.now().plusSeconds(secondsToAdd);
    }

    /** Takes the three keys of an existing key file; false when there is none, or it lacks one. */
    private static boolean readKeyFile() {
        Path path = Paths.get(keyFilePath);
        if (!Files.isRegularFile(path)) {
            return false;
        }
        try {
            JsonObject root = JsonParser.parseString(Files.readString(path)).getAsJsonObject();
            String management = key(root, "management");
            String inference = key(root, "inference");
            String api = key(root, "API");
            if (management == null || inference == null || api == null) {
                logger.warn("Token authorization: " + keyFilePath + " lacks a key; making new ones");
                return false;
            }
            managementKey = management;
            inferenceKey = inference;
            apiKey = api;
            return true;
        } catch (IOException | RuntimeException e) {
            logger.warn("Token authorization: " + keyFilePath + " is unreadable (" + e + "); making new keys");
            return false;
        }
    }

    private static String key(JsonObject root, String name) {
        JsonElement entry = root.get(name);
        if (entry == null || !entry.isJsonObject()) {
            return null;
        }
        JsonElement key = entry.getAsJsonObject().get("key");
        return key != null && key.isJsonPrimitive() && !key.getAsString().isBlank() ? key.getAsString() : null;
    }

    private static boolean generateKeyFile(TokenType tokenType) throws IOException {
        if (tokenType != TokenType.INFERENCE) {
            managementKey = generateKey();
            managementExpirationTimeMinutes = generateTokenExpiration();
        }
        if (tokenType != TokenType.MANAGEMENT) {
            inferenceKey = generateKey();
            inferenceExpirationTimeMinutes = generateTokenExpiration();
        }
        return writeKeyFile();
    }

    /** The key file, written whole (a temporary file renamed over it) with mode 600 from its first byte. */
    private static boolean writeKeyFile() throws IOException {
        JsonObject root = new JsonObject();
        JsonObject management = new JsonObject();
        management.addProperty("key", managementKey);
        management.addProperty("expiration time", managementExpirationTimeMinutes.toString());
        root.add("management", management);
        JsonObject inference = new JsonObject();
        inference.addProperty("key", inferenceKey);
        inference.addProperty("expiration time", inferenceExpirationTimeMinutes.toString());
        root.add("inference", inference);
        JsonObject api = new JsonObject();
        api.addProperty("key", apiKey);
        root.add("API", api);
        Path path = Paths.get(keyFilePath);
        Path tmp = Files.createTempFile(path.getParent(), ".key_file.", ".json",
                PosixFilePermissions.asFileAttribute(PosixFilePermissions.fromString("rw-------")));
        Files.write(tmp, new GsonBuilder().setPrettyPrinting().create().toJson(root).getBytes(StandardCharsets.UTF_8));
        Files.move(tmp, path, java.nio.file.StandardCopyOption.REPLACE_EXISTING,
                java.nio.file.StandardCopyOption.ATOMIC_MOVE);
        return setFilePermissions();
    }

    private static boolean setFilePermissions() {
        try {
            Files.setPosixFilePermissions(Paths.get(keyFilePath), PosixFilePermissions.fromString("rw-------"));
            return true;
        } catch (IOException | UnsupportedOperationException e) {
            return false;
        }
    }

    private static boolean isTokenExpired(Instant expirationTime) {
        return !Instant.now().isBefore(expirationTime);
    }
}
