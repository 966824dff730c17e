"""The files behind deploys: one-step writes, the per-model lock, retention, and putting an archive back (no server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.manifest import ArchiveError, check_archive, write_archive_digest
from models import durable
from models.paths import ROOT
from serve_config.control import deploys
from tests.conftest import TREE, built


def fake_archive(path: Path, payload: bytes) -> Path:
    """A file with a sha256 record beside it, as a kept archive has (retention reads nothing else)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    write_archive_digest(path)
    return path


def test_a_write_killed_midway_leaves_the_old_file_whole(tmp_path):
    """A writer SIGKILLed while writing leaves the old content (and no half file under the real name)."""
    target = tmp_path / "history.json"
    durable.write_atomic(target, "old")
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from models import durable\n"
        "with durable.replacing(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_text('new, half'); print('writing', flush=True); time.sleep(60)\n"), str(target)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()
        writer.wait()
    assert target.read_text() == "old"
    durable.write_atomic(target, "new")  # the leftover temporary file is no obstacle
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o644


def test_a_second_command_is_refused_while_one_holds_the_lock_and_a_killed_holder_releases_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from serve_config.control import deploys\n"
        "with deploys.lock(Path(sys.argv[1]), 'digits', 'deploy'):\n"
        "    print('held', flush=True); time.sleep(60)\n"), str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(deploys.DeployInProgress, match=rf"cannot roll back .*deploy by PID {holder.pid}"):
            with deploys.lock(tmp_path, "digits", "roll back"):
                pass
        with deploys.lock(tmp_path, "shapes", "deploy"):  # another model is not held up
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the dead holder's lock
        try:
            with deploys.lock(tmp_path, "digits", "deploy"):
                break
        except deploys.DeployInProgress:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_retention_keeps_the_last_versions_and_deletes_the_archives_of_the_rest(tmp_path):
    run_dir, store = tmp_path / "run", tmp_path / "store"
    entries = []
    for i in range(7):
        version = f"v{i}"
        kept = fake_archive(deploys.kept_archive(run_dir, "digits", version), version.encode())
        fake_archive(store / deploys.versioned_name("digits", version), version.encode())
        entries.append({"version": version, "archive": str(kept)})
    fake_archive(deploys.kept_archive(run_dir, "digits", "0badf00d"), b"left by a rollback")  # in no history
    fake_archive(store / "digits-v2-1.0.mar", b"model digits-v2")  # another model whose name begins with ours
    kept = deploys.retain(run_dir, "digits", store, entries, 3)
    assert [e["version"] for e in kept] == ["v4", "v5", "v6"]
    assert not deploys.kept_archive(run_dir, "digits", "0badf00d").exists()
    assert (store / "digits-v2-1.0.mar").exists()
    for i in range(7):
        present = i >= 4
        for folder in (run_dir / deploys.DEPLOYS_DIR, store):
            mar = folder / f"digits-v{i}.mar"
            assert mar.exists() == present and mar.with_name(mar.name + ".sha256").exists() == present, mar
    with pytest.raises(deploys.ServerError, match="at least 1"):
        deploys.retain(run_dir, "digits", store, kept, 0)


@pytest.mark.slow  # needs a built archive
def test_place_puts_back_a_missing_or_half_copied_archive(tmp_path):
    """`place` copies only where the destination does not hold the same archive; a damaged copy is replaced."""
    source = built(TREE.model_store / "digits.mar")
    dest = tmp_path / "store" / source.name
    dest.parent.mkdir()
    deploys.place(source, dest)
    assert check_archive(dest) == check_archive(source)
    stamp = dest.stat().st_mtime_ns
    deploys.place(source, dest)  # already there: untouched
    assert dest.stat().st_mtime_ns == stamp
    dest.write_bytes(dest.read_bytes()[: dest.stat().st_size // 2])  # a copy killed halfway
    with pytest.raises(ArchiveError):
        check_archive(dest)
    deploys.place(source, dest)
    assert check_archive(dest) == check_archive(source)
