"""Checked-in serving configuration (config.properties, one model-config YAML per model) and the control
plane that starts and probes TorchServe with it (serve_config.control)."""
