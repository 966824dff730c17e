"""`make archive` never destroys the last good archive: a pack that fails leaves the old .mar and its digest
as they were, and a pack that succeeds replaces both whole. torch-model-archiver runs for real, on small files."""

from __future__ import annotations

import subprocess

import pytest

from export import archive
from export import manifest as mf
from models.paths import ROOT


@pytest.fixture
def inputs(tmp_path):
    serialized = tmp_path / "model.bin"
    serialized.write_bytes(b"weights v1")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "index_to_name.json").write_text("{}")
    config = tmp_path / "model.yaml"
    config.write_text("batchSize: 1\n")
    return serialized, ROOT / "handlers" / "handler.py", staging, config


def test_a_failed_pack_leaves_the_last_good_archive(tmp_path, inputs, monkeypatch):
    serialized, handler, staging, config = inputs
    store = tmp_path / "store"
    good = archive.pack("m", serialized, handler, staging, config, store)
    before = (good.read_bytes(), (store / "m.mar.sha256").read_text())
    real_run = subprocess.run

    def archiver_dies_midway(command, **kwargs):  # as a crash or a kill would: a partial file, then failure
        export_path = command[command.index("--export-path") + 1]
        with open(f"{export_path}/m.mar", "wb") as partial:
            partial.write(b"PK\x03\x04 partial")
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(archive.subprocess, "run", archiver_dies_midway)
    serialized.write_bytes(b"weights v2")
    with pytest.raises(subprocess.CalledProcessError):
        archive.pack("m", serialized, handler, staging, config, store)
    assert (good.read_bytes(), (store / "m.mar.sha256").read_text()) == before
    assert before[1].split()[0] == mf.sha256(good)
    assert sorted(p.name for p in store.iterdir()) == ["m.mar", "m.mar.sha256"], "the partial pack was left behind"

    monkeypatch.setattr(archive.subprocess, "run", real_run)
    new = archive.pack("m", serialized, handler, staging, config, store)
    assert new.read_bytes() != before[0]
    assert (store / "m.mar.sha256").read_text().split()[0] == mf.sha256(new)
    assert sorted(p.name for p in store.iterdir()) == ["m.mar", "m.mar.sha256"]
