package org.servemodels.oip;

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
}
