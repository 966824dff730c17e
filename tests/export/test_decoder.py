"""The decoder exports of the generating models (export/decoder.py): each artifact verified greedy-token-identical
to the eager decoder, a decoder that drifts refused by name, and the archive packing the decoder its model-config
YAML names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

from export import decoder
from export.verify import STAMP
from models import chat, paths, registry
from models.paths import ROOT
from tests.conftest import TREE, built

GENERATORS = list(registry.GENERATORS)


@pytest.mark.parametrize("model", GENERATORS)
def test_every_decoder_artifact_gave_eager_s_greedy_tokens_for_20_prompts_of_32_tokens(model):
    stamp = json.loads(built(TREE.artifacts(model) / STAMP).read_text())
    assert stamp["prompts"] == len(decoder.VERIFY_PROMPTS) == 20 and stamp["tokens_per_prompt"] == 32
    assert set(stamp["artifacts"]) == set(decoder.FORMATS)
    for fmt, figures in stamp["artifacts"].items():
        assert figures["tokens_identical"] == figures["tokens"] == 20 * 32, fmt


def test_a_decoder_that_drifts_from_its_checkpoint_fails_verification_naming_the_prompt_and_step(tmp_path):
    artifacts = built(TREE.artifacts("chat-tiny") / STAMP).parent
    drifted = tmp_path / "checkpoint"
    shutil.copytree(TREE.checkpoint("chat-tiny"), drifted)
    state = torch.load(drifted / chat.WEIGHTS, weights_only=True)
    state["layers.1.down_proj.weight"] += 0.5 * torch.randn(state["layers.1.down_proj.weight"].shape,
                                                            generator=torch.Generator().manual_seed(0))
    torch.save(state, drifted / chat.WEIGHTS)
    copy = tmp_path / "artifacts"
    shutil.copytree(artifacts, copy)
    (copy / STAMP).unlink()
    proc = subprocess.run([sys.executable, "-m", "export.decoder", "--checkpoint", str(drifted), "--out", str(copy),
                           "--verify-only"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "differs from eager at step" in proc.stderr and "program: prompt" in proc.stderr, proc.stderr
    assert "aoti: prompt" in proc.stderr
    assert not (copy / STAMP).exists()


def test_the_archive_serves_the_decoder_the_model_config_names_and_nothing_else():
    backend = yaml.safe_load(paths.model_config("chat").read_text())["handler"]["backend"]
    with zipfile.ZipFile(built(TREE.model_store / "chat-tiny.mar")) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("manifest.json"))
    assert set(manifest["artifacts"]) == {backend}
    served = manifest["artifacts"][backend]["file"]
    assert served in names
    others = {chat.GGUF_FILE, chat.WEIGHTS, *(e for e in ("model.program.pt2", "model.aoti.pt2") if e != served)}
    assert not others & names
