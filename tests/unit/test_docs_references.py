"""What README.md and docs/ name exists: every repository path, every module (and attribute) written as a dotted
name, and every make target written as a command. A rename that leaves a page behind fails here."""

from __future__ import annotations

import importlib
import importlib.util
import re

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What a build or a running server writes (never committed), and paths inside TorchServe's own jar or repository
GENERATED = ("run/", "build/", "checkpoints/", "artifacts/", "model_store/", "mobile/", "results/")
UPSTREAM = {"META-INF/io.netty.versions.properties", "frontend/gradle.properties", "ts/protocol/otf_message_handler.py"}
PATH = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]+\.(?:py|yaml|yml|md|java|txt|cfg|properties|json|sh|cpp|in|xml|"
                  r"http))(?![\w/])")
MODULE = re.compile(r"(?<![\w/.-])((?:handlers|models|export|loadtest|serve_config|tests)(?:\.[A-Za-z_]\w*)+)"
                    r"(?![\w/])")
# a make command: in backticks in the text, or a line of a fenced code block
TARGET = re.compile(r"(?:`|^\s*(?:\$ )?)make (?:-\S+ )*(?:[A-Z_]+=\S+ )*([a-z][a-z0-9-]*)", re.M)
FENCED = re.compile(r"^```[\w-]*\n(.*?)^```", re.M | re.S)


def targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*)\s*:", (ROOT / "Makefile").read_text(), re.M))


def commands(text: str) -> str:
    """The text's make commands: backticked ones, and the code blocks' lines (prose never starts a line with one)."""
    return "\n".join(re.findall(r"`make [^`]*", text) + FENCED.findall(text))


def named(pattern: re.Pattern) -> list[tuple[str, str]]:
    return sorted({(page.relative_to(ROOT).as_posix(), name) for page in PAGES
                   for name in pattern.findall(commands(page.read_text()) if pattern is TARGET else page.read_text())})


def resolves(dotted: str) -> bool:
    """A module, or an attribute of one (a class, a function, a constant)."""
    if dotted.endswith(".py"):
        return True  # a file name (`export.py`), which PATH checks where it has a folder
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:cut]))
        except (ModuleNotFoundError, ValueError):
            spec = None
        if spec is None:
            continue
        value = importlib.import_module(".".join(parts[:cut]))
        for attribute in parts[cut:]:
            if not hasattr(value, attribute):
                return False
            value = getattr(value, attribute)
        return True
    return False


def test_the_pages_are_found():
    assert len(PAGES) >= 8 and named(PATH) and named(MODULE) and named(TARGET)


def test_every_path_the_docs_name_exists():
    missing = [(page, path) for page, path in named(PATH)
               if not path.startswith(GENERATED) and path not in UPSTREAM
               and not (ROOT / path).exists() and not (ROOT / "docs" / path).exists()]
    assert missing == []


def test_every_module_the_docs_name_imports():
    assert [(page, name) for page, name in named(MODULE) if not resolves(name)] == []


def test_every_make_target_the_docs_name_is_the_makefiles():
    known = targets()
    assert [(page, target) for page, target in named(TARGET) if target not in known] == []


@pytest.mark.parametrize("text, found", [("run `make serve` first", "serve"), ("```bash\nmake RECIPE=quick bench\n```\n", "bench"),
                                         ("make it so", None), ("`make -n serve`", "serve")])
def test_the_target_pattern_reads_commands_not_prose(text, found):
    assert (TARGET.findall(commands(text)) or [None])[0] == found


def test_the_readme_stays_short_and_leads_with_the_request_path_and_the_files_to_read_first():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 16_000, f"README.md is {len(text.encode())} bytes; move detail to docs/"
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:2] == ["How a request travels", "Read these files first"], headings
    first = text[text.index("## Read these files first"):]
    first = first[:first.index("\n## ", 1)]
    assert len(re.findall(r"^\d+\. `", first, re.M)) >= 5
