"""Read TorchServe's Prometheus endpoint: the handler's batch counters and the frontend's own metrics."""

from __future__ import annotations

import re
from typing import Mapping

import requests

_LINE = re.compile(r'^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> (name, labels, value) per sample; comments skipped."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match:
            labels = dict(_LABEL.findall(match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def model_counters(text: str, model: str) -> dict[str, float]:
    """Every sample labelled with `model` (ModelName for handler metrics, model_name for the frontend's),
    summed over other labels; batches by size are kept apart as 'HandlerBatchesBySize[<size>]'."""
    totals: dict[str, float] = {}
    for name, labels, value in parse(text):
        if labels.get("ModelName", labels.get("model_name")) != model:
            continue
        key = f"{name}[{labels['BatchSize']}]" if "BatchSize" in labels else name
        totals[key] = totals.get(key, 0.0) + value
    return totals


def scrape(metrics_url: str, model: str, headers: Mapping[str, str] | None = None) -> dict[str, float]:
    answer = requests.get(f"{metrics_url}/metrics", headers=dict(headers or {}), timeout=10)
    answer.raise_for_status()
    return model_counters(answer.text, model)


def delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}
