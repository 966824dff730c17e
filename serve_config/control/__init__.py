"""The control plane of one TorchServe instance: start, wait for, probe, re-key and stop it.

- instance: an instance's run directory, ports, addresses and keys;
- probe: readiness, defined once (the server's own readiness route), for every caller: start's wait, `make ready`,
  rollout, the pods' probes (this file runs as a script in the image), and the fleet's HAProxy asks the same route;
- lifecycle: config rendering, start (archives and ports checked first), readiness wait, stop by process-group PID;
- records: PID records that name their process exactly (boot and start time);
- supervisor: the process group's leader, which restarts TorchServe when it dies;
- deploys: the version of each model a run directory serves, which every (re)start serves: the folder
  contract with serve_config.rollout (history, kept archives, the per-model lock, retention);
- access: workers, readiness of an instance (probe's), key rotation;
- netns: network namespaces, for a fleet's replicas that are hosts of their own;
- cli: `python -m serve_config.control`, behind `make serve/stop/token/ready/rotate-token`.

The names callers use are re-exported here: `from serve_config import control`.
"""

from export.manifest import ArchiveError, IntegrityError, check_archive
from serve_config.control.access import model_workers, ready, rotate_token
from serve_config.control.instance import (KEY_FILE, KEY_KINDS, OUT_FILE, PID_FILE, Ports, Server, ServerError,
                                           port_free, port_holder, read_keys, read_properties)
from serve_config.control.lifecycle import (LOG_CONFIG, PLUGIN_JAR, PLUGINS_DIR, TEMPLATE, ModelLoadError, PortInUse,
                                           end_group, group_alive, load_failure, render_config, start, stop,
                                           wait_ready)
from serve_config.control import deploys, netns
from serve_config.control.records import owned_pid, read_pid, record_pid

__all__ = ["KEY_FILE", "KEY_KINDS", "LOG_CONFIG", "OUT_FILE", "PID_FILE", "PLUGIN_JAR", "PLUGINS_DIR", "TEMPLATE",
           "ArchiveError", "check_archive", "deploys", "end_group", "group_alive", "IntegrityError", "load_failure",
           "model_workers", "ModelLoadError", "netns", "owned_pid", "port_free", "port_holder", "PortInUse", "Ports",
           "read_keys", "read_pid", "read_properties", "ready", "record_pid", "render_config", "rotate_token",
           "Server", "ServerError", "start", "stop", "wait_ready"]
