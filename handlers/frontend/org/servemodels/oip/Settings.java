package org.servemodels.oip;

import com.google.gson.JsonElement;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.List;
import org.pytorch.serve.util.ConfigManager;

/** Our own keys of config.properties (TorchServe keeps every key it reads, known or not). */
final class Settings {
    private Settings() {}

    /** The positive whole number under `key`, or `fallback` when it is absent or not one (said on stderr). */
    static long number(String key, long fallback) {
        String text = ConfigManager.getInstance().getProperty(key, String.valueOf(fallback)).trim();
        try {
            long value = Long.parseLong(text);
            if (value > 0) {
                return value;
            }
        } catch (NumberFormatException e) {
            // said below
        }
        System.err.println(key + "=" + text + " is not a positive whole number; using " + fallback);
        return fallback;
    }

    /**
     * The models `make serve` is still building (serve_config/control/building.py writes them, as JSON
     * {"building": [...]}, to the file config.properties names under `building_file`): empty when the key is absent,
     * the file is gone or unreadable. The readiness route reports them, and is not ready while there are any.
     */
    static List<String> building() {
        String path = ConfigManager.getInstance().getProperty("building_file", "").trim();
        List<String> names = new ArrayList<>();
        if (path.isEmpty()) {
            return names;
        }
        try {
            String text = new String(Files.readAllBytes(Paths.get(path)), StandardCharsets.UTF_8);
            JsonElement list = JsonParser.parseString(text).getAsJsonObject().get("building");
            if (list != null && list.isJsonArray()) {
                for (JsonElement name : list.getAsJsonArray()) {
                    names.add(name.getAsString());
                }
            }
        } catch (IOException | RuntimeException e) {
            // no file (nothing is building), or one being replaced: nothing to report
        }
        return names;
    }
}
