"""Run the Locust load test headless against a running server and summarise it (`make loadtest`).

Writes Locust's CSV and HTML report under <out>/<model>-<timestamp>/, prints requests/s, p50/p95/p99
and failures, and exits non-zero when any request failed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from models.paths import ROOT
from serve_config.control import ServerError, end_group, read_keys
# How loadtest/users.py labels a 503; not imported from there, since importing locust gevent-patches this process.
REJECTED = "rejected"


@dataclass(frozen=True)
class Summary:
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rejected: int = 0  # failures that were 503s: the server shedding load past its job queue, not crashing
    seconds: int = 0  # how long the run really lasted, from the first to the last row of its stats history

    def line(self) -> str:
        return (f"requests {self.requests}  failures {self.failures} (of them rejected, 503: {self.rejected})  "
                f"{self.rps:.1f} req/s over {self.seconds} s  "
                f"p50 {self.p50_ms:.0f} ms  p95 {self.p95_ms:.0f} ms  p99 {self.p99_ms:.0f} ms")


def summarise(stats_csv: Path) -> Summary:
    """The 'Aggregated' row of Locust's <prefix>_stats.csv, with the rejections from <prefix>_failures.csv and
    the run's length from <prefix>_stats_history.csv (one row a second)."""
    with stats_csv.open() as handle:
        row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    rejected = 0
    failures_csv = stats_csv.with_name(stats_csv.name.replace("_stats.csv", "_failures.csv"))
    if failures_csv.exists():
        with failures_csv.open() as handle:
            rejected = sum(int(r["Occurrences"]) for r in csv.DictReader(handle) if r["Error"].startswith(REJECTED))
    seconds = 0
    history_csv = stats_csv.with_name(stats_csv.name.replace("_stats.csv", "_stats_history.csv"))
    if history_csv.exists():
        with history_csv.open() as handle:
            stamps = [int(r["Timestamp"]) for r in csv.DictReader(handle)]
        seconds = stamps[-1] - stamps[0] if stamps else 0
    percentile = lambda key: float("nan") if row[key] == "N/A" else float(row[key])  # noqa: E731  (no request)
    return Summary(int(row["Request Count"]), int(row["Failure Count"]), float(row["Requests/s"]),
                   percentile("50%"), percentile("95%"), percentile("99%"), rejected, seconds)


def by_name(stats_csv: Path) -> dict[str, tuple[int, int]]:
    """{request name: (requests, failures)} from Locust's <prefix>_stats.csv, the Aggregated row left out. With
    LOADTEST_BY_VERSION=1 a 200 answer's name carries the model version that answered it (loadtest/users.py)."""
    with stats_csv.open() as handle:
        return {r["Name"]: (int(r["Request Count"]), int(r["Failure Count"])) for r in csv.DictReader(handle)
                if r["Name"] != "Aggregated"}


class LoadError(RuntimeError):
    """A load run that did what its caller waited for too late, or not at all; the message says which and why."""


class Run:
    """One headless Locust run in its own process, so that a caller can act on the servers while the load flows
    (the fleet's failover and rolling-update tests, deploy and rollback).

    A run of a fixed `duration` ends by itself (`finish`). A run with `duration=None` lasts as long as the
    operation it accompanies: start it, wait until requests flow (`wait_flowing`), do the operation, then `stop`
    it. So a test never races a load of fixed length against work whose length depends on the host's speed.
    Such a run is still bounded: it ends by itself after `max_seconds` whatever its caller does.
    `workers` > 0 runs Locust distributed: one master and that many worker processes (`--processes`), so one
    core's worth of load generator is not the limit."""

    def __init__(self, model: str, url: str, token: str, *, users: int, duration: str | None, out: Path,
                 workers: int = 0, by_version: bool = False, max_seconds: int = 900) -> None:
        self.report_dir = out / f"{model}-{dt.datetime.now():%Y%m%d-%H%M%S-%f}"
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.stop_file = self.report_dir / "stop"
        env = {**os.environ, "MODEL": model, "TS_TOKEN": token, "PYTHONPATH": str(ROOT),
               "LOADTEST_BY_VERSION": "1" if by_version else "", "LOADTEST_STOP_FILE": str(self.stop_file)}
        command = [str(Path(sys.executable).parent / "locust"), "-f", str(ROOT / "loadtest" / "locustfile.py"),
                   "--headless", "--host", url, "--users", str(users), "--spawn-rate", str(users),
                   "--run-time", duration or f"{max_seconds}s", "--stop-timeout", "10",
                   "--csv", str(self.report_dir / "locust"), "--html", str(self.report_dir / "report.html"),
                   "--only-summary", "--loglevel", "WARNING", *(["--processes", str(workers)] if workers > 0 else [])]
        self.log = open(self.report_dir / "locust.log", "w")
        self.process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def requests(self) -> int:
        """Requests answered so far (failures included), as Locust last wrote them (about once a second)."""
        try:
            with self.stats_csv.open() as handle:
                row = next((r for r in csv.DictReader(handle) if r["Name"] == "Aggregated"), None)
        except (OSError, csv.Error):
            return 0
        return int(row["Request Count"]) if row else 0

    def wait_flowing(self, more: int = 20, *, timeout: float = 180.0) -> int:
        """Wait until `more` requests beyond those counted now have been answered: the load is really flowing
        (Locust's start builds payloads and spawns users first, seconds on a loaded host). The count then."""
        wanted, deadline = self.requests() + more, time.monotonic() + timeout
        while (count := self.requests()) < wanted:
            if self.process.poll() is not None:
                raise LoadError(f"locust exited ({self.process.returncode}) after {count} requests, before "
                                f"{wanted}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise LoadError(f"{count} requests after {timeout:.0f} s, wanted {wanted}: the load is not flowing "
                                f"(is the server answering?)\n{self.tail()}")
            time.sleep(0.25)
        return count

    def stop(self, timeout: float = 120.0) -> Summary:
        """End the run now, the way its run time would (users stopped, statistics and report written)."""
        self.stop_file.touch()
        return self.finish(timeout)

    def finish(self, timeout: float | None = None) -> Summary:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_group(self.process.pid, timeout=10, sig=signal.SIGKILL)
            raise LoadError(f"locust did not end within {timeout:.0f} s; killed\n{self.tail()}") from None
        finally:
            self.log.close()
        if not self.stats_csv.exists():
            raise LoadError(f"locust wrote no statistics (exit {code}):\n{self.tail()}")
        return summarise(self.stats_csv)

    def tail(self) -> str:
        return (self.report_dir / "locust.log").read_text(errors="replace")[-3000:]

    @property
    def stats_csv(self) -> Path:
        return self.report_dir / "locust_stats.csv"


def run(model: str, url: str, token: str, *, users: int, duration: str, out: Path,
        workers: int = 0) -> tuple[Summary, Path]:
    locust = Run(model, url, token, users=users, duration=duration, out=out, workers=workers)
    return locust.finish(), locust.report_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "run", help="where `make serve` keeps key_file.json")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration", default="30s", help="Locust run time, e.g. 30s or 2m")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "loadtest")
    parser.add_argument("--workers", type=int, default=0,
                        help="Locust worker processes under one master (distributed mode); 0: one process")
    parser.add_argument("--token-file", type=Path, help="the bearer token from a file (a fleet's balancer), "
                        "instead of the key TorchServe wrote in --run-dir")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        print("error: load goes to loopback only", file=sys.stderr)
        return 2
    try:
        token = args.token_file.read_text().strip() if args.token_file else read_keys(args.run_dir)["inference"]
    except (ServerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary, report_dir = run(args.model, args.url, token, users=args.users, duration=args.duration, out=args.out,
                              workers=args.workers)
    how = f", {args.workers} Locust workers" if args.workers else ""
    print(f"{args.model}: {args.users} users for {args.duration}{how}: {summary.line()}")
    print(f"report: {report_dir}/report.html, CSV: {report_dir}/locust_stats.csv")
    return 1 if summary.failures or not summary.requests else 0


if __name__ == "__main__":
    sys.exit(main())
