"""Executed documentation: the fenced ``python`` blocks of a Markdown page, run in order in one namespace.

A page's blocks share one namespace, as a reader who pastes them one after another into one interpreter would:
the second block may use what the first defined. A block that must not run (it needs a server, a GPU or a real
checkpoint on disk) is marked on the line just before its fence, with the reason::

    <!-- not run: needs a running hub server -->
    ```python
    ...
    ```

A marker without a reason is an error, and so is a marker that is not followed by a ``python`` fence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")
_MARK = re.compile(r"^\s*<!--\s*not run:(?P<reason>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced ``python`` block of a page.

    Attributes:
        page: the page's path relative to the repository root.
        line: the 1-based line of the opening fence.
        code: the block's source, dedented to the fence's indentation.
        skip: why the block is not run, or ``None`` when it runs.
    """

    page: str
    line: int
    code: str
    skip: str | None = None


def blocks(page: Path) -> list[Block]:
    """Every fenced ``python`` block of ``page``, in order.

    Args:
        page: a Markdown file.

    Returns:
        The page's Python blocks with their line numbers and skip reasons.

    Raises:
        ValueError: a ``not run`` marker has no reason, is not followed by a ``python`` fence, or a fence is
            never closed.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    rel = str(page.resolve().relative_to(ROOT)) if page.resolve().is_relative_to(ROOT) else str(page)
    found: list[Block] = []
    pending: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        mark = _MARK.match(lines[i])
        if mark:
            reason = mark.group("reason").strip()
            if not reason:
                raise ValueError(f"{rel}:{i + 1}: a 'not run' marker must say why, e.g. <!-- not run: needs a GPU -->")
            pending = (i + 1, reason)
            i += 1
            continue
        fence = _FENCE.match(lines[i])
        if not fence:
            if pending and lines[i].strip():
                raise ValueError(f"{rel}:{pending[0]}: a 'not run' marker must stand on the line just before a "
                                 f"```python fence, found {lines[i].strip()[:40]!r}")
            i += 1
            continue
        ticks, indent = fence.group("ticks"), len(fence.group("indent"))
        language = fence.group("info").strip().split(" ")[0].strip("{}.").lower()
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{rel}:{start + 1}: the {ticks} fence is never closed")
        i += 1
        if language in ("python", "py"):
            found.append(Block(rel, start + 1, "\n".join(body) + "\n", pending[1] if pending else None))
        elif pending:
            raise ValueError(f"{rel}:{pending[0]}: a 'not run' marker must precede a ```python fence, "
                             f"found a {language or 'plain'} fence")
        pending = None
    return found


def pages() -> list[Path]:
    """Every Markdown page under ``docs/``, sorted by path (symbolic links to folders are not followed)."""
    return sorted(p for p in DOCS.rglob("*.md") if "__pycache__" not in p.parts)


def run_page(page: Path, namespace: dict | None = None) -> int:
    """Run the page's runnable blocks in order, in one namespace.

    Args:
        page: a Markdown file.
        namespace: the globals to run in (a fresh one when ``None``).

    Returns:
        How many blocks ran.

    Raises:
        Exception: whatever a block raises, with the page and the block's line in the traceback's file name.
    """
    namespace = {"__name__": "__docs__"} if namespace is None else namespace
    ran = 0
    for block in blocks(page):
        if block.skip is None:
            exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)
            ran += 1
    return ran
