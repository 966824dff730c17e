"""Serving: pure request/batch functions, the runtime (device policy and backends), TorchServe adapters."""
