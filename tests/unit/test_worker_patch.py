"""serve_config/torch_free.py: TorchServe's worker made to start without torch, on exactly the file it was written
for and on nothing else; and the image's variants, which decide where it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_config import torch_free
from serve_config.cluster import image


def shipped_file() -> Path:
    """TorchServe 0.12.0's own otf_message_handler.py, as this venv installed it (unpatched: this venv has torch)."""
    import ts

    return Path(ts.__file__).parent / "protocol" / "otf_message_handler.py"


def venv_with(tmp_path: Path, source: bytes) -> Path:
    target = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / torch_free.MODULE
    target.parent.mkdir(parents=True)
    target.write_bytes(source)
    return tmp_path / "venv"


def test_the_shipped_file_is_patched_once_and_then_imports_without_torch(tmp_path):
    venv = venv_with(tmp_path, shipped_file().read_bytes())
    patched = (next(venv.glob("lib/*/site-packages")) / torch_free.MODULE)
    cache = tmp_path / "cache.py"
    cache.hardlink_to(patched)  # an installer's cache shares the file (uv links it): the cache must keep it
    assert torch_free.main([str(venv)]) == 0
    assert torch_free.digest(patched.read_bytes()) == torch_free.PATCHED
    assert torch_free.digest(cache.read_bytes()) == torch_free.SHIPPED
    assert "already patched" in torch_free.apply(venv)
    # the patched module, with torch made unimportable, loads and still encodes an answer of bytes
    probe = ("import importlib.util, sys; sys.modules['torch'] = None; "
             "spec = importlib.util.spec_from_file_location('patched', sys.argv[1]); "
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); assert m.torch is None; "
             "print(len(m.create_predict_response([b'ok'], {0: 'id'}, 'done', 200)))")
    answer = subprocess.run([sys.executable, "-c", probe, str(patched)], capture_output=True, text=True)
    assert answer.returncode == 0 and int(answer.stdout) > 0, answer.stderr
    unpatched = subprocess.run([sys.executable, "-c", probe, str(shipped_file())], capture_output=True, text=True)
    assert unpatched.returncode != 0 and "import of torch halted" in unpatched.stderr  # what the patch is for


@pytest.mark.parametrize("change", [b"# an edit\n", b""])
def test_any_other_file_is_refused_and_left_as_it_is(tmp_path, change, capsys):
    source = shipped_file().read_bytes() + change if change else shipped_file().read_bytes().replace(b"import torch\n",
                                                                                                     b"import torch  \n")
    venv = venv_with(tmp_path, source)
    assert torch_free.main([str(venv)]) == 1
    assert "not torchserve 0.12.0's" in capsys.readouterr().err
    assert (next(venv.glob("lib/*/site-packages")) / torch_free.MODULE).read_bytes() == source


def test_the_cpu_image_refuses_models_that_need_torch_before_it_builds():
    assert image.needing_torch(["cancer", "digits", "minilm", "shapes"]) == []
    assert image.needing_torch(["digits", "chat-tiny"]) == ["chat-tiny"]
    with pytest.raises(RuntimeError, match=r"chat-tiny need torch.*VARIANT=cpu-torch"):
        image.build("t", ["digits", "chat-tiny"], Path("model_store"), base=None, podman=["false"], variant="cpu")
    assert image.VARIANTS["cpu"][1] == "runtime-cpu.txt" and image.VARIANTS["cuda"][1] == "runtime.txt"
