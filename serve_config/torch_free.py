"""Make an installed TorchServe 0.12.0 start its Python workers without torch: `python -m serve_config.torch_free
<venv>` (the CPU image's build runs it; docs/deploy.md).

Of the modules a TorchServe worker imports, one imports torch: ts/protocol/otf_message_handler.py, at module level,
to serialise a handler's answer that is a torch tensor (torch.save). Our handlers answer bytes and strings, and the
CPU image has no torch, so the import is made optional there and the tensor branch is taken only where torch was
imported. Nothing else changes.

It fails closed: the file is rewritten only when it is byte for byte the one torchserve 0.12.0 ships (its sha256),
and the result is checked against the sha256 of the patched file; any other file (another TorchServe, an edit) is
refused with the path and both digests, and nothing is written. A file already patched is left as it is. The
patched file replaces the old one by a rename, so a hard link to the old one (an installer's cache) keeps it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

MODULE = Path("ts") / "protocol" / "otf_message_handler.py"
SHIPPED = "83e82dc62b4a95a362efe4518786c6b389b895b85acaf37721aaff042ec9989a"  # torchserve 0.12.0's file
PATCHED = "68683c63c588c0cf9f6431504e51a4045f93a8aa95a14543b4246b3a7e76dfba"  # the same file after EDITS

EDITS = (
    ("import torch\n",
     "try:  # torch-free workers (serve_config/torch_free.py): answers that are tensors need torch, ours never are\n"
     "    import torch\n"
     "except ImportError:\n"
     "    torch = None\n"),
    ("            elif isinstance(val, torch.Tensor):\n",
     "            elif torch is not None and isinstance(val, torch.Tensor):\n"),
)


class Refused(RuntimeError):
    """The file is not the one this patch was written for."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def patched(source: bytes) -> bytes:
    """TorchServe 0.12.0's otf_message_handler.py with torch optional; Refused for any other file."""
    if digest(source) != SHIPPED:
        raise Refused(f"not torchserve 0.12.0's {MODULE} (sha256 {digest(source)}, expected {SHIPPED})")
    text = source.decode("utf-8")
    for old, new in EDITS:
        if text.count(old) != 1:
            raise Refused(f"{MODULE}: expected one {old.strip()!r}")
        text = text.replace(old, new)
    result = text.encode("utf-8")
    if digest(result) != PATCHED:
        raise Refused(f"the patched {MODULE} has sha256 {digest(result)}, expected {PATCHED}")
    return result


def site_packages(venv: Path) -> Path:
    """The venv's site-packages that holds TorchServe."""
    found = sorted(venv.glob("lib/python3*/site-packages/ts"))
    if len(found) != 1:
        raise Refused(f"no single TorchServe under {venv}/lib/python3*/site-packages (found {len(found)})")
    return found[0].parent


def apply(venv: Path) -> str:
    """Patch the venv's TorchServe in place; say what was done."""
    path = site_packages(venv) / MODULE
    source = path.read_bytes()
    if digest(source) == PATCHED:
        return f"{path} is already patched"
    # A new file renamed over the old one, never written in place: an installer may have hard-linked the file from
    # its cache (uv does), and writing through the link would patch every environment that shares it.
    fresh = path.with_name(f".{path.name}.patched")
    fresh.write_bytes(patched(source))
    os.chmod(fresh, path.stat().st_mode & 0o7777)
    os.replace(fresh, path)
    return f"patched {path}: torch is optional in TorchServe's worker"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path, help="the virtual environment TorchServe is installed in")
    args = parser.parse_args(argv)
    try:
        print(apply(args.venv))
    except (Refused, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
