"""Checked-in serving configuration (config.properties, one model-config YAML per model) and the
server control used by `make serve`, `make stop`, `make token` and the integration tests."""
