"""Every fenced ```python block of README.md and docs/ runs as written.

One case per block, named ``page:line`` after the line of its opening fence. A block runs alone, as a
reader would paste it into a script: the block's source in a fresh namespace whose ``__name__`` is
``"__main__"``, in a temporary working directory, with torch's default thread count, the package's
default settings and the environment ``torchrun --nproc_per_node=1`` gives a script (so a block that
starts a process group runs as its only rank).

An HTML comment on the line right before a fence marks what a block needs:

- ``<!-- docs-test: needs cuda -->`` or ``<!-- docs-test: needs FrEIA -->`` (also nflows, zuko,
  normflows, revlib, memcnn; several joined by ``, ``): skipped, with the reason, only where the GPU
  is not visible or the package cannot be imported;
- ``<!-- docs-test: fragment (why) -->``: a block that cannot run by itself (a signature, an error
  shown); it is only compiled.

Any other ``docs-test`` comment, or one that is not right before a ```python fence, fails the test.
"""

from __future__ import annotations

import builtins
import dataclasses
import glob
import importlib
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist

import invkernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
PAGES = ["README.md", *(os.path.relpath(path, ROOT) for path in DOCS)]
# torch's thread count before any test runs (the suite's other tests may change it).
DEFAULT_THREADS = torch.get_num_threads()

PEER_LIBRARIES = ("FrEIA", "nflows", "zuko", "normflows", "revlib", "memcnn")
REQUIREMENT = "(?:" + "|".join(("cuda", *PEER_LIBRARIES)) + ")"
NEEDS = re.compile(rf"<!-- docs-test: needs ({REQUIREMENT}(?:, {REQUIREMENT})*) -->")
FRAGMENT = re.compile(r"<!-- docs-test: fragment \((\S[^)]*)\) -->")
# Anything that looks like a marker, misspelt ones included, so that a typo fails instead of being ignored.
MARKER_LIKE = re.compile(r"<!--\s*docs?[\s_-]*tests?\b", re.IGNORECASE)
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    source: str
    marker: str | None  # the line before the fence, when it is a marker-like comment

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def read_lines(page: str) -> list[str]:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read().split("\n")


def fenced_blocks(page: str) -> list[tuple[int, str, list[str]]]:
    """``(fence line, info string, body lines)`` of every fenced code block of a page (CommonMark fences:
    a closing fence of the same character, at least as long; the opening fence's indentation removed)."""
    lines = read_lines(page)
    found = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence, info = len(opening.group(1)), opening.group(2), opening.group(3).lower()
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        body = [re.sub(rf"^ {{0,{indent}}}", "", line) for line in lines[i + 1:end]]
        found.append((i + 1, info, body))
        i = end + 1
    return found


def python_blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        lines = read_lines(page)
        for line, info, body in fenced_blocks(page):
            if info not in ("python", "py"):
                continue
            before = lines[line - 2].strip() if line >= 2 else ""
            marker = before if MARKER_LIKE.match(before) else None
            blocks.append(Block(page, line, "\n".join(body) + "\n", marker))
    return blocks


BLOCKS = python_blocks()


def missing_requirement(needs: str) -> str | None:
    """Why a block marked ``needs ...`` cannot run here, or None when everything it needs is present."""
    for requirement in needs.split(", "):
        if requirement == "cuda":
            if not torch.cuda.is_available():
                return "needs a CUDA GPU"
            continue
        try:
            importlib.import_module(requirement)
        except ImportError as error:
            return f"needs {requirement} ({error})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _auto_runs_memory_free():
    """The docs run with the package's own ``memory_free="auto"`` threshold: this overrides conftest's
    fixture of the same name, which makes the other tests' tiny chains run memory-free."""
    yield


@pytest.fixture
def as_a_script(tmp_path, monkeypatch):
    """A temporary working directory, torch's default thread count, a one-rank torchrun environment;
    whatever global state a block changes (threads, dtype, grad mode, backend, process group) is put back."""
    monkeypatch.chdir(tmp_path)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                        "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    dtype, grad, backend = torch.get_default_dtype(), torch.is_grad_enabled(), invkernels.get_backend()
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(DEFAULT_THREADS)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        invkernels.set_backend(backend)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_block_runs(block: Block, as_a_script):
    # Blank lines before the source keep the Markdown's line numbers in tracebacks.
    code = compile("\n" * block.line + block.source, os.path.join(ROOT, block.page), "exec")
    if block.marker is not None:
        fragment, needs = FRAGMENT.fullmatch(block.marker), NEEDS.fullmatch(block.marker)
        assert fragment or needs, f"{block.name}: unknown marker {block.marker!r}"
        if fragment is not None:
            return
        reason = missing_requirement(needs.group(1))
        if reason is not None:
            pytest.skip(reason)
    exec(code, {"__name__": "__main__", "__builtins__": builtins})


def test_blocks_are_collected():
    assert len(BLOCKS) > 0, "no ```python block found in README.md and docs/"
    assert len({block.name for block in BLOCKS}) == len(BLOCKS)


def test_every_marker_is_known_and_before_a_python_fence():
    python_fences = {(block.page, block.line) for block in BLOCKS}
    for page in PAGES:
        for number, line in enumerate(read_lines(page), start=1):
            if not MARKER_LIKE.match(line.strip()):
                continue
            where = f"{page}:{number}: {line.strip()!r}"
            assert NEEDS.fullmatch(line.strip()) or FRAGMENT.fullmatch(line.strip()), (
                f"{where} is not a known marker: use '<!-- docs-test: needs cuda -->', "
                f"'<!-- docs-test: needs <{'|'.join(PEER_LIBRARIES)}> -->' or '<!-- docs-test: fragment (why) -->'")
            assert (page, number + 1) in python_fences, f"{where} should be on the line right before a ```python fence"
