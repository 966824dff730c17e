"""Serving: the checked-in configuration, and the control plane that runs TorchServe with it.

The map (each part has one home and one public seam; a part uses another only through that seam):

| part | what it owns | seam |
|---|---|---|
| `config.properties`, `log4j2.xml`, `<model>.yaml` | the server's settings and each model's handler/batching settings | files, read by the parts below and by `make archive` |
| `control/` | one TorchServe instance: start (ports and archives checked), the supervisor that restarts it, readiness (`control/probe.py`, the one definition), keys, stop by PID; which version of each model a run directory serves (`control/deploys.py`) | `from serve_config import control`; `python -m serve_config.control` (`make serve/stop/ready/token/rotate-token`) |
| `rollout.py` | version changes with no failed request: deploy, rollback, the fleet's rolling update; a lock per model, recovery of a killed command, retention | `python -m serve_config.rollout` (`make deploy/rollback/fleet-update`) |
| `fleet/` | N instances behind HAProxy: their state folder, the balancer and its runtime API | `from serve_config import fleet`; `python -m serve_config.fleet` (`make fleet...`) |
| `cluster/` | what leaves this machine: the image, the KServe bundle, Kubernetes and KServe manifests | `python -m serve_config.cluster.{image,bundle,manifests}` (`make image/bundle/k8s...`) |

Layering: control knows nothing of the others; rollout and fleet use control; cluster uses control's config
rendering and ships control's probe. Files are written in one step (models/durable.py).
"""
