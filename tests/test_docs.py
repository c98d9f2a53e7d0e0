"""The docs run: every ```python block of README.md and docs/*.md is executed, and every output the
docs show is compared with what the code prints.

A page is a script: its python blocks run in order, in one fresh interpreter whose working directory
is a temporary folder (files a block writes are there for the next one). Two markers, HTML comments
that do not show when the page is rendered, tie an output block to what printed it:

* ``<!-- docs-test: output -->`` right before a ```text block: the block is what the python block
  just above printed;
* ``<!-- docs-test: command -->`` right before a ```text block whose first line is ``$ <command>``:
  the rest of the block is what that command prints when run after the page's python blocks (only
  ``surgery ...`` commands, run as ``python -m surgery ...``).

Trailing spaces are ignored; nothing else is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(\w+)\s*-->\s*$")
SEP = "\x1e--- docs-test block {} ---\x1e"


@dataclass
class Block:
    lang: str
    text: str
    line: int
    marker: str | None


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown page, each with the marker comment right before it (if any)."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        assert j < len(lines), f"{path.name}:{i + 1}: a fence that is never closed"
        out.append(Block(m.group(1), "\n".join(lines[i + 1:j]), i + 1, marker.group(1) if marker else None))
        i = j + 1
    return out


def _norm(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


RUNNER = """
import contextlib, io, json, sys
blocks = json.loads(sys.argv[1])
ns = {"__name__": "__main__"}
for i, (line, code) in enumerate(blocks):
    print(%r.format(i), flush=True)
    exec(compile(code, f"{sys.argv[2]}:{line}", "exec"), ns)
    sys.stdout.flush()
""" % SEP


def run_page(page: Path, cwd: Path) -> list[str]:
    """Run the page's python blocks in order in one interpreter; the stdout of each block."""
    code = [(b.line, b.text) for b in blocks(page) if b.lang == "python"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0",
           # where deepspeed is installed, importing transformers' models logs to stdout that it chose the CPU
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    res = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(code), page.name], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{page.name}: a python block failed\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    parts = res.stdout.split("\n")
    outs, current = [], None
    for line in parts:
        if line.startswith("\x1e--- docs-test block "):
            current = []
            outs.append(current)
        elif current is not None:
            current.append(line)
    return ["\n".join(o) for o in outs]


def _pages_with_python():
    return [p for p in PAGES if any(b.lang == "python" for b in blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_python(), ids=lambda p: p.name)
def test_every_python_block_runs_and_prints_what_the_page_shows(page, tmp_path):
    outputs = iter(run_page(page, tmp_path))
    printed = None
    for b in blocks(page):
        if b.lang == "python":
            printed = next(outputs)
        elif b.marker == "output":
            assert printed is not None, f"{page.name}:{b.line}: an output block with no python block above"
            assert _norm(b.text) == _norm(printed), f"{page.name}:{b.line}: the page shows\n{b.text}\nthe code prints\n{printed}"
        elif b.marker == "command":
            first, _, shown = b.text.partition("\n")
            assert first.startswith("$ surgery "), f"{page.name}:{b.line}: a command block starts with '$ surgery ...'"
            argv = shlex.split(first[2:])[1:]
            res = subprocess.run([sys.executable, "-m", "surgery", *argv], cwd=tmp_path, capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
            got = res.stdout + res.stderr
            assert _norm(shown) == _norm(got), f"{page.name}:{b.line}: `{first[2:]}` prints\n{got}"


def test_markers_sit_on_the_blocks_they_describe():
    for page in PAGES:
        for b in blocks(page):
            if b.marker is not None:
                assert b.marker in ("output", "command") and b.lang == "text", f"{page.name}:{b.line}"


def test_every_page_has_no_unknown_fence_language():
    for page in PAGES:
        for b in blocks(page):
            assert b.lang in ("python", "bash", "text", "json", "toml", ""), f"{page.name}:{b.line}: ```{b.lang}"


# ---- links between the pages -------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*\]\(([^)\s]+)\)")


def _prose(path: Path) -> list[tuple[int, str]]:
    """The lines of a page outside fenced blocks, with their numbers."""
    out, fenced = [], False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append((i, line))
    return out


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lowercased, punctuation but '-' and '_' dropped,
    spaces to '-'; a repeated one gets -1, -2 ..."""
    seen: dict[str, int] = {}
    for _, line in _prose(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        if n:
            seen[f"{slug}-{n}"] = 1
    return set(seen)


def test_anchors_are_githubs():
    page = ROOT / "docs" / "training.md"
    assert "the-multi-sample-dropout-loss-paper-form" in anchors(page)
    assert "surgerycompute_loss-one-call-for-any-loop" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_between_pages_leads_somewhere(page):
    """Every relative link (and image) of README.md and docs/*.md names a file that exists and, with
    '#anchor', a heading of that page."""
    broken = []
    for number, line in _prose(page):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto: ... (not checked offline)
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.name}:{number}: {target} (no file {file})")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}:{number}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "\n".join(broken)
