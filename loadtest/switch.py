"""How much longer requests wait while a version is switched: wrk against one server, first with nothing
changing, then through one `make deploy` and one `make rollback`, side by side in one run (`make switch-bench`).

    python -m loadtest.switch --model digits --model-store build/quick/model_store [--seconds 20] [--out DIR]

It starts its own server (free loopback ports) from a copy of the store, so nothing of `make serve` is touched.
wrk keeps `--connections` requests in flight for the whole phase with its 2 s timeout: a request with no answer
within it counts as a timeout. Printed per phase: requests, errors (non-2xx, socket errors), timeouts, latency
p50 / p99 / p99.9 / max. The goal (issue: smooth switches): no error, no timeout, and the slowest request of the
switch phase at most `--slack` (1 s) slower than the slowest of the steady phase; exit 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from export.manifest import check_archive, copy_archive
from loadtest.payloads import payloads
from models.paths import FULL
from serve_config import control
from serve_config.rollout import Rollout, versioned_copy

# wrk's Lua hooks: every request the same real payload; at the end one JSON line of what wrk measured.
LUA = """
wrk.method = "POST"
wrk.body = io.open("{body}", "rb"):read("*a")
wrk.headers["Content-Type"] = "{content_type}"
wrk.headers["Authorization"] = "Bearer {token}"
done = function(summary, latency, requests)
  io.write(string.format('RESULT {{"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_ms": %.2f, "p99_ms": %.2f, "p999_ms": %.2f, "max_ms": %.2f}}\\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000))
end
"""


def wrk(url: str, script: Path, *, connections: int, seconds: float | None, timeout_s: int = 2) -> subprocess.Popen:
    """wrk on one thread with `connections` in flight; for `seconds`, or (None) until it is sent SIGINT."""
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (Debian's package; `make prereqs`)")
    duration = f"{int(seconds)}s" if seconds else "3600s"
    return subprocess.Popen([binary, "-t1", f"-c{connections}", f"-d{duration}", "--timeout", f"{timeout_s}s",
                             "-s", str(script), url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=120)
    line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no result:\n{out}")
    row = json.loads(line[len("RESULT "):])
    row["errors"] = row["non2xx"] + row["connect"] + row["read"] + row["write"]
    return row


def new_build(store: Path, model: str, tag: str) -> None:
    """The store's archive rebuilt with other bytes (`tag` in its MANIFEST), as `make archive` leaves it."""
    fresh = versioned_copy(store / f"{model}.mar", store / "next" / f"{model}.mar", tag)
    copy_archive(fresh, store / f"{model}.mar")


def measure(model: str, store: Path, work: Path, *, seconds: float, connections: int) -> dict:
    server = control.start(work / "run", [model], ports=control.Ports.free(), model_store=store)
    try:
        payload = payloads(model, 1)[0]
        (work / "body").write_bytes(payload.body)
        script = work / "post.lua"
        script.write_text(LUA.format(body=work / "body", content_type=payload.content_type,
                                     token=server.keys()["inference"]))
        url = f"{server.inference_url}/predictions/{model}"
        result(wrk(url, script, connections=connections, seconds=5))  # warm-up: workers, caches, connections
        steady = result(wrk(url, script, connections=connections, seconds=seconds))
        new_build(store, model, f"switch-{time.time_ns()}")
        rollout, steps = Rollout(server, model, store), {}
        running = wrk(url, script, connections=connections, seconds=None)
        try:
            time.sleep(2)
            t0 = time.monotonic()
            steps["deploy"] = rollout.deploy()
            time.sleep(2)
            steps["rollback"] = rollout.rollback()
            time.sleep(2)
            steps["switch_s"] = round(time.monotonic() - t0, 1)
        finally:
            running.send_signal(signal.SIGINT)
        switching = result(running)
        return {"model": model, "connections": connections, "steady": steady, "switching": switching, "steps": steps}
    finally:
        control.stop(server.run_dir)


def line(name: str, row: dict) -> str:
    return (f"{name:<10} {row['requests']:>7} requests in {row['duration_us'] / 1e6:5.1f} s  errors {row['errors']}  "
            f"timeouts {row['timeout']}  p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms  "
            f"p99.9 {row['p999_ms']:.1f} ms  max {row['max_ms']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--model-store", type=Path, default=FULL.model_store)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the steady phase")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--slack", type=float, default=1.0, help="seconds the slowest request may add while switching")
    parser.add_argument("--out", type=Path, help="write the figures as switch.json here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="switch-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        check_archive(args.model_store / f"{args.model}.mar")
        copy_archive(args.model_store / f"{args.model}.mar", store / f"{args.model}.mar")
        figures = measure(args.model, store, work, seconds=args.seconds, connections=args.connections)
    steady, switching = figures["steady"], figures["switching"]
    added_ms = switching["max_ms"] - steady["max_ms"]
    figures["added_max_ms"] = round(added_ms, 1)
    print(line("steady", steady))
    print(line("switching", switching))
    deploy, rollback = figures["steps"]["deploy"], figures["steps"]["rollback"]
    print(f"deploy {deploy['from']} -> {deploy['version']} and rollback -> {rollback['version']} within "
          f"{figures['steps']['switch_s']} s; the slowest request while switching: {added_ms:+.0f} ms against steady")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "switch.json").write_text(json.dumps(figures, indent=2))
    failed = [why for why, bad in (("errors", switching["errors"] > 0), ("timeouts", switching["timeout"] > 0),
                                   (f"over {args.slack} s slower", added_ms > args.slack * 1000)) if bad]
    if failed:
        print(f"NOT SMOOTH: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
