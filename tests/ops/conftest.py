"""Fixtures of the ops tier."""

from __future__ import annotations

import pytest

from serve_config import control as ts


@pytest.fixture
def private_server(tmp_path):
    """start(models, **kwargs) -> a server of this test's own; every one started is stopped at the end."""
    run_dirs = []

    def start(models, **kwargs):
        run_dir = tmp_path / f"run{len(run_dirs)}"
        run_dirs.append(run_dir)
        return ts.start(run_dir, models, ports=ts.Ports.free(), **kwargs)

    yield start
    for run_dir in run_dirs:
        ts.stop(run_dir)
