"""The C++ runner (libtorch alone, no Python in the process) loads each served model's TorchScript and AOTInductor
exports and prints what the Python backends give on the same batch; bad arguments and a file that is no model get
a message and a non-zero exit."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from export import manifest as mf
from export.native import NATIVE_FORMATS, compare, parse
from tests.conftest import ROOT, SERVED, TREE, built

RUNNER = ROOT / "build" / "cpp" / "runner"


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_the_cpp_runner_prints_the_same_outputs_as_python(spec):
    artifacts = built(TREE.artifacts(spec.name) / mf.MANIFEST).parent
    report = compare(spec, artifacts, built(RUNNER), batch=3)
    assert set(report) == set(NATIVE_FORMATS) & set(spec.formats) and "trace" in report
    for fmt, result in report.items():
        assert result["same_layout"], (fmt, [(n.dtype, n.shape) for n in result["native"]],
                                       [(p.dtype, p.shape) for p in result["python"]])
        assert result["native"][0].shape[0] == 3
        assert result["max_abs_diff"] <= 1e-5, fmt
        assert all(np.isfinite(n).all() for n in result["native"] if n.dtype.kind == "f")


def test_the_runner_parses_every_output_of_a_multi_output_printout():
    outputs = parse("output 0 float32 2x2\n1 2.5 -3 4e-07\noutput 1 int64 2\n7 -1\n")
    assert outputs[0].dtype == np.float32 and outputs[0].tolist() == [[1.0, 2.5], [-3.0, pytest.approx(4e-07)]]
    assert outputs[1].dtype == np.int64 and outputs[1].tolist() == [7, -1]


def test_the_runner_refuses_bad_arguments_and_files_that_are_no_model(tmp_path):
    runner = built(RUNNER)
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    usage = subprocess.run([str(runner)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    short = subprocess.run([str(runner), "m.pt", f"{tmp_path / 'x.bin'}:float32:2x3"], capture_output=True, text=True)
    assert short.returncode == 2 and "holds 16 bytes" in short.stderr and "needs 24" in short.stderr
    dtype = subprocess.run([str(runner), "m.pt", f"{tmp_path / 'x.bin'}:complex64:2"], capture_output=True, text=True)
    assert dtype.returncode == 2 and "unknown dtype 'complex64'" in dtype.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    for name in ("junk.pt", "junk.aoti.pt2"):
        (tmp_path / name).write_bytes(b"not a model")
        bad = subprocess.run([str(runner), str(tmp_path / name), f"{tmp_path / 'x.bin'}:float32:4"], capture_output=True,
                             text=True)
        assert bad.returncode == 1 and bad.stderr.startswith(f"error: {tmp_path / name}: "), bad.stderr
        assert "frame #" not in bad.stderr  # the message, not libtorch's backtrace
