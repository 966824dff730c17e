"""The control plane of a TorchServe instance: start, wait for, probe, re-key and stop it.

- instance: an instance's run directory, ports, addresses and keys;
- lifecycle: config rendering, start (archives checked first), readiness wait, stop by process-group PID;
- access: workers, the readiness probe and key rotation;
- cli: `python -m serve_config.control`, behind `make serve/stop/token/ready/rotate-token`.

The names callers use are re-exported here: `from serve_config import control`.
"""

from export.manifest import ArchiveError, IntegrityError, check_archive
from serve_config.control.access import has_ready_worker, model_workers, ready, rotate_token
from serve_config.control.instance import KEY_FILE, PID_FILE, Ports, Server, ServerError, read_keys, read_properties
from serve_config.control.lifecycle import (TEMPLATE, ModelLoadError, end_group, group_alive, load_failure, render_config,
                                           start, stop, wait_ready)

__all__ = ["ArchiveError", "IntegrityError", "KEY_FILE", "ModelLoadError", "PID_FILE", "Ports", "Server", "ServerError",
           "TEMPLATE", "check_archive", "end_group", "group_alive", "has_ready_worker", "load_failure", "model_workers",
           "read_keys", "read_properties", "ready", "render_config", "rotate_token", "start", "stop", "wait_ready"]
