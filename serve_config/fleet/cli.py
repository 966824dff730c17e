"""The fleet's command line: `make fleet/fleet-stop/fleet-status/fleet-token/fleet-reload-token` call it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.paths import FULL, ROOT
from serve_config.control import ServerError
from serve_config.fleet import Fleet, launch, reload_token, shutdown, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fleet of TorchServe replicas behind HAProxy")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start N replicas behind HAProxy")
    p_start.add_argument("--replicas", type=int, default=3)
    p_start.add_argument("--models", nargs="+", required=True)
    p_start.add_argument("--model-store", type=Path, default=FULL.model_store)
    p_start.add_argument("--port", type=int, default=8090)
    p_start.add_argument("--stats-port", type=int, default=8091)
    p_start.add_argument("--token-file", type=Path)
    p_start.add_argument("--isolation", choices=("auto", "netns", "loopback"), default="auto",
                         help="each replica in a network namespace of its own (netns: root), or on the host's loopback")
    for name in ("stop", "status", "token", "reload-token"):
        sub.add_parser(name)
    for p in sub.choices.values():
        p.add_argument("--root", type=Path, default=ROOT / "run" / "fleet")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "start":
            if args.replicas < 1:
                parser.error("--replicas must be at least 1")
            fleet = launch(args.root, args.replicas, args.models, model_store=args.model_store, port=args.port,
                           stats_port=args.stats_port, token_file=args.token_file, isolation=args.isolation)
            where = "each in its own network namespace" if fleet.replicas[0].netns else "on the host's loopback"
            print(f"fleet of {args.replicas} up ({where}): {fleet.url} (token: {fleet.token_file}), per-replica stats "
                  f"http://{fleet.bind}:{fleet.stats_port}/stats")
            print(f'  curl -H "Authorization: Bearer $(cat {fleet.token_file})" -T docs/examples/digits/seven.png '
                  f"{fleet.url}/predictions/{fleet.models[0]}")
        elif args.cmd == "stop":
            shutdown(args.root)
            print(f"fleet in {args.root} stopped")
        elif args.cmd == "status":
            fleet = Fleet.load(args.root.resolve())
            for name, row in stats(fleet).items():
                print(f"{name:<12} {row['status']:<10} in flight {row['scur']:>4}  served {row['stot']:>8}  "
                      f"errors {row['eresp'] or 0}")
        elif args.cmd == "token":
            print(Fleet.load(args.root.resolve()).token())
        elif args.cmd == "reload-token":
            changed = reload_token(Fleet.load(args.root.resolve()))
            print("the balancer now takes the new token; the old one is refused" if changed
                  else "the token file holds the token in use; nothing to do")
    except (ServerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

