"""The control plane's command line: `make serve/stop/token/ready/rotate-token` call it.

    python -m serve_config.control start --run-dir run --models digits [--inference-port 8080 ...]
    python -m serve_config.control serve --run-dir run --models cancer digits --build CMD --check CMD [...]
    python -m serve_config.control token --run-dir run [--kind inference|management|api]
    python -m serve_config.control stop --run-dir run
    python -m serve_config.control ready --run-dir run [--models digits ...]   # readiness probe, exit 0/1
    python -m serve_config.control rotate-token --run-dir run [--kind inference|management]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.manifest import IntegrityError
from models import registry
from models.paths import FULL, ROOT
from serve_config.control.access import ready, rotate_token
from serve_config.control.instance import KEY_KINDS, PID_FILE, Ports, Server, ServerError, read_keys
from serve_config.control import building
from serve_config.control.lifecycle import ModelLoadError, PortInUse, add_model, refuse_if_running, start, stop
from serve_config.control.records import read_pid
from serve_config.control.supervisor import run as supervise

# The make variable that moves each port of `make serve` (Makefile), for the message when one is taken.
PORT_VARIABLES = {"inference": "INFERENCE_PORT", "management": "MANAGEMENT_PORT", "metrics": "METRICS_PORT",
                  "grpc_inference": "GRPC_PORTS", "grpc_management": "GRPC_PORTS"}


def curl_example(server: Server, model: str) -> str:
    """A ready-to-paste curl line for `model`, from its registry entry's example request."""
    url = f"{server.inference_url}/predictions/{model}"
    example = registry.REGISTRY[model].example if model in registry.REGISTRY else None
    body = example.curl_arguments() if example else '-H "Content-Type: <media type>" --data-binary @<file>'
    return f'curl -H "Authorization: Bearer $(make -s token)" {body} {url}'


def _started(server: Server, models: list[str]) -> str:
    return (f"TorchServe is up (PID {server.pid()}), serving {', '.join(models)}\n"
            f"  inference  {server.inference_url}\n  management {server.management_url}\n"
            f"  metrics    {server.metrics_url}/metrics\n  logs       {server.run_dir / 'logs'}\n"
            f"Try:\n  {curl_example(server, models[0])}")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve_config.control", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start TorchServe in the background and wait until every model is ready")
    p_serve = sub.add_parser("serve", help="build and serve --models one after the other: the server answers once the "
                                           "first is built, and serves each other as soon as it is (`make serve`)")
    p_serve.add_argument("--build", required=True, help="the command that builds {archive} (make)")
    p_serve.add_argument("--check", required=True, help="the command that exits 0 when {archive} is up to date")
    for p in (p_start, p_serve):  # the server both start
        p.add_argument("--models", nargs="+", required=True)
        p.add_argument("--model-store", type=Path, default=FULL.model_store)
        p.add_argument("--inference-port", type=int, default=8080)
        p.add_argument("--management-port", type=int, default=8081)
        p.add_argument("--metrics-port", type=int, default=8082)
        p.add_argument("--grpc-ports", type=int, nargs=2, default=(7070, 7071), metavar=("INFERENCE", "MANAGEMENT"))
        p.add_argument("--timeout", type=float, default=180.0)
    p_token = sub.add_parser("token", help="print a key of the running server")
    p_token.add_argument("--kind", choices=KEY_KINDS, default="inference")
    p_stop = sub.add_parser("stop", help="stop the server started from --run-dir, by its PID")
    p_ready = sub.add_parser("ready", help="readiness probe: exit 0 when every model (default: every served one) has a "
                                           "worker that loaded it (serve_config/control/probe.py; usable as an exec probe)")
    p_ready.add_argument("--models", nargs="*")
    p_rotate = sub.add_parser("rotate-token", help="replace the inference or management key of the running server")
    p_rotate.add_argument("--kind", choices=("inference", "management"), default="inference")
    p_supervise = sub.add_parser("supervise", help="(started by `start`) keep the run directory's TorchServe running")
    for p in (p_start, p_serve, p_token, p_stop, p_ready, p_rotate, p_supervise):
        p.add_argument("--run-dir", type=Path, default=ROOT / "run")
    return parser


def serve(args) -> int:
    """`make serve`: building.serve with this command line's server, the outcome said as `start` says it."""
    ports = Ports(args.inference_port, args.management_port, args.metrics_port, *args.grpc_ports)
    refuse_if_running(args.run_dir.resolve())  # before any build: the running one's record is its own
    failed: dict[str, str] = {}

    def begin(names: list[str]) -> Server:
        try:
            server = start(args.run_dir, names, ports=ports, model_store=args.model_store, timeout=args.timeout)
        except ModelLoadError as err:
            failed.update(err.failed)
            server = err.server
        print(_started(server, [n for n in names if n not in failed] or names), flush=True)
        return server

    failed.update(building.serve(args.run_dir, args.models, model_store=args.model_store, build=args.build,
                                 check=args.check, start=begin,
                                 add=lambda server, name: add_model(server, name, args.model_store,
                                                                    timeout=args.timeout),
                                 say=lambda line: print(f"make serve: {line}", flush=True)))
    served = [m for m in args.models if m not in failed]
    if failed:
        print(f"TorchServe serves {', '.join(served) or 'no model'}; these models are not served:", file=sys.stderr)
        for name, why in failed.items():
            print(f"  {name}: {why}", file=sys.stderr)
        return 1
    print(f"make serve: every model is served: {', '.join(served)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd == "start":
            ports = Ports(args.inference_port, args.management_port, args.metrics_port, *args.grpc_ports)
            server = start(args.run_dir, args.models, ports=ports, model_store=args.model_store, timeout=args.timeout)
            print(_started(server, args.models))
        elif args.cmd == "serve":
            return serve(args)
        elif args.cmd == "supervise":
            return supervise(args.run_dir.resolve())
        elif args.cmd == "token":
            print(read_keys(args.run_dir)[args.kind])
        elif args.cmd == "ready":
            ok, why = ready(Server.from_run_dir(args.run_dir), args.models or None)
            pending = building.describe(building.read(args.run_dir)) if not args.models else None
            print(f"not ready: {pending}" if pending and "still building" in why else why)
            return 0 if ok else 1
        elif args.cmd == "rotate-token":
            rotate_token(Server.from_run_dir(args.run_dir), args.kind)
            print(f"the {args.kind} key was replaced; the old one no longer works (`make -s token` prints the new one)")
        else:
            record = read_pid(args.run_dir / PID_FILE)
            if record is not None and record.stale:
                print(f"{record.stale}: not signalled; the stale {args.run_dir / PID_FILE} is removed")
            print("stopped TorchServe" if stop(args.run_dir) else "no TorchServe was running from " + str(args.run_dir))
    except ModelLoadError as err:
        served = [m for m in args.models if m not in err.failed]
        print(f"TorchServe is up (PID {err.server.pid()}) and serving {', '.join(served) or 'no model'}, but these "
              f"models failed to load and are not served:", file=sys.stderr)
        for name, why in err.failed.items():
            print(f"  {name}: {why}", file=sys.stderr)
        print(f"  logs: {err.server.run_dir / 'logs'}", file=sys.stderr)
        return 1
    except PortInUse as err:
        moves = sorted({PORT_VARIABLES[role] for role in err.taken})
        print(f"PortInUse: {err}; nothing was started. Stop what holds it, or choose other ports: "
              f"make serve {' '.join(f'{v}=...' for v in moves)}", file=sys.stderr)
        return 1
    except (ServerError, IntegrityError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0
