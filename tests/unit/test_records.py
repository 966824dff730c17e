"""Process hygiene of the control plane, with no TorchServe: PID records that never let `make stop` or the fleet
signal a process that is not theirs, files replaced whole, and logs bounded by size by their configuration.
(tests/ops/test_hygiene.py: the same against a real TorchServe.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from models.paths import ROOT
from serve_config import control as ts
from serve_config.control import records


@pytest.fixture
def sleeper():
    """A process of its own group that is not a TorchServe: what a stale PID file could name."""
    process = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def alive(process: subprocess.Popen) -> bool:
    return process.poll() is None


def test_write_atomic_replaces_the_whole_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "state" / "fleet.json"
    records.write_atomic(path, "first\n")
    records.write_atomic(path, "second\n", mode=0o600)
    assert path.read_text() == "second\n" and (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["fleet.json"]


def test_a_record_names_its_process_until_the_number_means_another(tmp_path, sleeper):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid_file = run_dir / ts.PID_FILE
    records.record_pid(pid_file, sleeper.pid)
    assert records.owned_pid(pid_file) == sleeper.pid
    assert ts.Server(run_dir, ts.Ports()).pid() == sleeper.pid
    # The same number, but a process started at another time: after the recorded one ended, the kernel gave
    # its PID to someone else. Never ours to signal.
    data = json.loads(pid_file.read_text())
    pid_file.write_text(json.dumps({**data, "started": data["started"] - 3600}))
    assert ts.Server(run_dir, ts.Ports()).pid() is None
    assert ts.stop(run_dir) is False
    assert alive(sleeper) and not pid_file.exists()


@pytest.mark.parametrize("stale", ["other boot", "bare PID"])
def test_make_stop_never_signals_a_stale_record(tmp_path, sleeper, stale):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid_file = run_dir / ts.PID_FILE
    if stale == "other boot":  # the file survived a reboot; its number now names an unrelated process
        records.record_pid(pid_file, sleeper.pid)
        pid_file.write_text(json.dumps({**json.loads(pid_file.read_text()), "boot_id": "an-earlier-boot"}))
    else:  # a bare PID, as files were written before records named their process
        pid_file.write_text(f"{sleeper.pid}\n")
    stop = subprocess.run([sys.executable, "-m", "serve_config.control", "stop", "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and "not signalled" in stop.stdout and "no TorchServe was running" in stop.stdout
    assert alive(sleeper) and not pid_file.exists()


def test_a_group_whose_leader_died_is_still_stopped(tmp_path):
    """The leader gone, its children alive: the number cannot be reused while the group exists, so it is ours."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    leader = subprocess.Popen(["bash", "-c", "sleep 120 & wait"], start_new_session=True)
    records.record_pid(run_dir / ts.PID_FILE, leader.pid)
    time.sleep(0.3)
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait()
    assert ts.group_alive(leader.pid)
    assert ts.stop(run_dir) is True
    assert not ts.group_alive(leader.pid)


def test_the_host_log_configuration_bounds_every_log_by_size():
    """Every appender rolls over by size into a numbered, capped set of files (a dated pattern would keep files
    forever), and nothing is copied to the console (the launcher's torchserve.out stays small)."""
    root = ET.parse(ts.LOG_CONFIG).getroot()
    appenders = list(root.find("Appenders"))
    assert appenders and all(a.tag == "RollingFile" for a in appenders), [a.tag for a in appenders]
    total = 0
    for appender in appenders:
        pattern = appender.get("filePattern")
        assert "%i" in pattern and "%d" not in pattern, pattern
        size = appender.find("SizeBasedTriggeringPolicy").get("size")
        number, unit = size.split()
        keep = int(appender.find("DefaultRolloverStrategy").get("max"))
        total += float(number) * {"KB": 2**10, "MB": 2**20}[unit] * (1 + keep)
        assert appender.find("TimeBasedTriggeringPolicy") is None
    assert total <= 200 * 2**20, f"logs may hold {total / 2**20:.0f} MiB"
    names = {a.get("name") for a in appenders}
    refs = {ref.get("ref") for ref in root.iter("AppenderRef")}
    assert refs <= names and names <= refs, (names, refs)
