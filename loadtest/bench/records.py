"""The records the bench passes between its parts: what to drive (Target, Step, Plan), what one step measured
(StepResult), and the one way a plan is run (`run`: Locust in its own process, loadtest/bench/drive.py, which
monkey-patches everything it imports with gevent, so it never runs inside the caller).

bench.py, sweep.py and soak.py plan; drive.py runs a plan; report.py, sweep.py and soak.py read the results. A plan
and its results cross the process boundary as JSON (`to_json` / `from_json`); everywhere else they are these types.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.paths import ROOT


@dataclass(frozen=True)
class Target:
    """One served model the bench calls: its role in the report (served, ceiling, peer, `backend <b>`, a request
    form's name, a sweep variant, capacity, soak), the endpoint (model name) and the form of its requests."""

    target: str
    endpoint: str
    workers: int = 1
    backend: str | None = None  # set on the served model's other backends (registry bench.backends)
    form: str = "native"  # loadtest.payloads.FORMS


@dataclass(frozen=True)
class Step:
    """`users` Locust users on `target` for `seconds` after `warmup`: a closed loop, or with `rate` (requests/s in
    all) open pacing. A step lasts until `min_requests` answers came (default: one per user), at most
    `max_seconds`."""

    target: Target
    users: int
    warmup: float
    seconds: float
    rate: float | None = None
    min_requests: int | None = None
    max_seconds: float = 120.0

    @property
    def wanted(self) -> int:
        return self.users if self.min_requests is None else self.min_requests

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Step":
        return cls(**{**data, "target": Target(**data["target"])})


@dataclass(frozen=True)
class Plan:
    """A server to drive (its loopback URL, tokens and PID) and the steps, in order; `payload_model`'s payloads
    (`samples` of them) go to every step."""

    host: str
    metrics_url: str
    server_pid: int
    inference_token: str
    management_token: str
    payload_model: str
    steps: tuple[Step, ...] = ()
    samples: int = 64

    def with_steps(self, steps) -> "Plan":
        return dataclasses.replace(self, steps=tuple(steps))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        return cls(**{**data, "steps": tuple(Step.from_json(s) for s in data["steps"])})

    @classmethod
    def for_server(cls, server, payload_model: str) -> "Plan":
        """A plan with no steps yet for a started serve_config.control server."""
        keys = server.keys()
        return cls(host=server.inference_url, metrics_url=server.metrics_url, server_pid=server.pid(),
                   inference_token=keys["inference"], management_token=keys["management"],
                   payload_model=payload_model)


@dataclass(frozen=True)
class StepResult:
    """What one step measured: Locust's answers and latency percentiles, the CPU of the load generator and of every
    TorchServe process (cores: CPU seconds per wall second), and what the server's /metrics counters moved by."""

    step: Step
    wall_s: float
    requests: int
    failures: int
    rps: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    loadgen_cores: float
    server_cores: float
    server_metrics: dict[str, float] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    rejected: int = 0

    @property
    def target(self) -> Target:
        return self.step.target

    @property
    def users(self) -> int:
        return self.step.users

    @property
    def clean(self) -> bool:
        """Answers came, and none failed."""
        return self.failures == 0 and self.requests > 0

    def flat(self) -> dict[str, Any]:
        """One row of a report: the target's and the step's fields beside the figures."""
        step = dataclasses.asdict(self.step)
        return {**step.pop("target"), **step, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                                  if f.name != "step"}}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StepResult":
        return cls(**{**data, "step": Step.from_json(data["step"]), "errors": tuple(data["errors"])})


def run(plan: Plan, work: Path, name: str = "steps") -> list[StepResult]:
    """Every step of `plan`, driven by loadtest/bench/drive.py in its own process; the plan and the results are
    kept in `work` (<name>-plan.json, <name>.json)."""
    plan_file, out = work / f"{name}-plan.json", work / f"{name}.json"
    plan_file.write_text(json.dumps(plan.to_json(), indent=1))
    subprocess.run([sys.executable, "-m", "loadtest.bench.drive", "--plan", str(plan_file), "--out", str(out)],
                   cwd=ROOT, check=True)
    return [StepResult.from_json(r) for r in json.loads(out.read_text())]
