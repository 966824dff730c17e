package org.pytorch.serve.archive.utils;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonParseException;
import java.io.File;
import java.io.FileNotFoundException;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.Reader;
import java.net.MalformedURLException;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.nio.file.FileAlreadyExistsException;
import java.nio.file.Files;
import java.util.List;
import java.util.Map;
import java.util.regex.Pattern;
import org.apache.commons.io.FileUtils;
import org.apache.commons.io.FilenameUtils;
import org.pytorch.serve.archive.DownloadArchiveException;
import org.pytorch.serve.archive.model.InvalidModelException;
import org.pytorch.serve.archive.s3.HttpUtils;
import org.yaml.snakeyaml.LoaderOptions;
import org.yaml.snakeyaml.Yaml;
import org.yaml.snakeyaml.constructor.Constructor;
import org.yaml.snakeyaml.error.YAMLException;

/**
 * TorchServe 0.12's archive helpers, with the same members and one more check. Every model or workflow
 * registration (management REST and gRPC, a workflow's own models, start-up) asks downloadArchive first, and
 * TorchServe applies allowed_urls only to what looks like a URL: any other string that names a directory on
 * the host was then loaded as a model, its handler code included. Here a registration that is not a URL must
 * be the plain name of an entry of the store, so nothing outside the store is ever loaded. Substituted for
 * TorchServe's class at start-up by org.servemodels.oip.FrontendPatches, only when that class's bytes are the
 * 0.12.0 release's.
 */
public final class ArchiveUtils {
    static {
        org.servemodels.oip.FrontendPatches.inForce("org/pytorch/serve/archive/utils/ArchiveUtils");
    }

    public static final Gson GSON = new GsonBuilder().setPrettyPrinting().create();
    // TorchServe's own test of "is this a URL" (its "file?" admits fil:// too); allowed_urls applies to these.
    private static final Pattern URL_LIKE = Pattern.compile("file?://.*|http(s)?://.*", Pattern.CASE_INSENSITIVE);

    private ArchiveUtils() {}

    public static <T> T readFile(File file, Class<T> type) throws InvalidModelException, IOException {
        try (Reader reader = new InputStreamReader(Files.newInputStream(file.toPath()), StandardCharsets.UTF_8)) {
            return GSON.fromJson(reader, type);
        } catch (JsonParseException e) {
            throw new InvalidModelException("Failed to parse signature.json.", e);
        }
    }

    public static <T> T readYamlFile(File file, Class<T> type) throws InvalidModelException, IOException {
        Yaml yaml = new Yaml(new Constructor(type, new LoaderOptions()));
        try (Reader reader = new InputStreamReader(Files.newInputStream(file.toPath()), StandardCharsets.UTF_8)) {
            return yaml.load(reader);
        } catch (YAMLException e) {
            throw new InvalidModelException("Failed to parse model config yaml file.", e);
        }
    }

    public static Map<String, Object> readYamlFile(File file) throws InvalidModelException, IOException {
        Yaml yaml = new Yaml();
        try (Reader reader = new InputStreamReader(Files.newInputStream(file.toPath()), StandardCharsets.UTF_8)) {
            return yaml.load(reader);
        } catch (YAMLException e) {
            throw new InvalidModelException("Failed to parse model config yaml file.", e);
        }
    }

    public static boolean validateURL(List<String> allowedUrls, String url) throws InvalidArchiveURLException {
        for (String allowed : allowedUrls) {
            if (Pattern.compile(allowed, Pattern.CASE_INSENSITIVE).matcher(url).matches()) {
                return true;
            }
        }
        if (isValidURL(url)) {
            throw new InvalidArchiveURLException("Given URL " + url + " does not match any allowed URL(s)");
        }
        return false;
    }

    public static boolean isValidURL(String url) {
        return URL_LIKE.matcher(url).matches();
    }

    public static String getFilenameFromUrl(String url) {
        try {
            return FilenameUtils.getName(new URL(url).getPath());
        } catch (MalformedURLException e) {
            return FilenameUtils.getName(url);
        }
    }

    /**
     * Refuses a registration that is neither a URL (left to allowed_urls) nor the plain name of an existing entry
     * of the store that `location` lies in: an absolute or relative path, a name with a separator, a name the store
     * does not hold, or one that the server's working directory holds too.
     */
    static void requireInStore(List<String> allowedUrls, File location, String url) throws InvalidArchiveURLException {
        if (isValidURL(url) || validateURL(allowedUrls, url)) { // validateURL throws only for what isValidURL admits
            return;
        }
        String refused = "Registration from " + url + " refused: name an archive of the model store by its file name"
                + " (as `make deploy` does), or a URL that allowed_urls admits";
        if (url.isEmpty() || url.indexOf('\0') >= 0 || !url.equals(FilenameUtils.getName(url))
                || url.equals(".") || url.equals("..") || !location.getName().equals(url)) {
            throw new InvalidArchiveURLException(refused);
        }
        if (!location.exists()) {
            throw new InvalidArchiveURLException("The model store holds no " + url);
        }
        try {
            // TorchServe tries the name in its working directory before the store's entry: that must be the same.
            File elsewhere = new File(url).getCanonicalFile();
            if (elsewhere.exists() && !elsewhere.equals(location.getCanonicalFile())) {
                throw new InvalidArchiveURLException(refused);
            }
        } catch (IOException e) {
            throw new InvalidArchiveURLException(refused); // NOPMD: the path itself is the message
        }
    }

    public static boolean downloadArchive(List<String> allowedUrls, File location, String archiveName, String url,
            boolean s3SseKmsEnabled) throws FileAlreadyExistsException, FileNotFoundException,
                    DownloadArchiveException, InvalidArchiveURLException {
        requireInStore(allowedUrls, location, url);
        try {
            return HttpUtils.copyURLToFile(allowedUrls, url, location, s3SseKmsEnabled, archiveName);
        } catch (InvalidArchiveURLException | FileAlreadyExistsException e) {
            throw e;
        } catch (IOException e) {
            FileUtils.deleteQuietly(location);
            throw new DownloadArchiveException("Failed to download archive from: " + url, e);
        }
    }
}
