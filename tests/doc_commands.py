"""The shell commands of README.md and docs/*.md, as the tests read them: fenced ```bash blocks, split into commands.

One reader for both doc tests (every command parses: tests/test_docs.py; the training and own-data sequences run:
tests/test_user_journey.py), so that a command changed in the docs is the command the tests check.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
_HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
_ANY_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _headings(text: str) -> list[re.Match]:
    """Markdown headings outside fenced blocks (a `# comment` in a bash block is no heading)."""
    fenced = [m.span() for m in _ANY_FENCE.finditer(text)]
    return [h for h in _HEADING.finditer(text) if not any(a <= h.start() < b for a, b in fenced)]


def _section(text: str, heading: str, name: str) -> tuple[int, str]:
    """(offset, text) of the section under `heading`, up to the next heading of any level."""
    headings = _headings(text)
    match = next((h for h in headings if h.group(1).strip() == heading), None)
    if match is None:
        raise LookupError(f"{name} has no heading {heading!r}; headings: {[h.group(1) for h in headings]}")
    end = next((h.start() for h in headings if h.start() > match.start()), len(text))
    return match.start(), text[match.start():end]


@dataclass(frozen=True)
class DocCommand:
    """One command of a ```bash block: its words (comments removed, `\\` continuations joined) and where it is."""

    argv: tuple[str, ...]
    source: str  # "docs/training.md:42"

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number of the block's first line, text) of every ```bash block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in _FENCE.finditer(text)]


def block_commands(block: str, first_line: int, where: str) -> list[DocCommand]:
    """The commands of one block, one per logical line (a line ending in `\\`, or inside an open quote, continues on
    the next)."""
    commands, pending, start = [], "", first_line
    for number, line in enumerate(block.splitlines(), start=first_line):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        try:
            words = shlex.split(pending + line, comments=True)
        except ValueError:  # a quoted argument that goes on over the next lines (curl -d '{...}')
            pending += line + "\n"
            continue
        pending = ""
        if words:
            commands.append(DocCommand(tuple(words), f"{where}:{start}"))
    return commands


def doc_commands(path: Path) -> list[DocCommand]:
    """Every command of every ```bash block of `path`, in order."""
    where = str(path.relative_to(REPO))
    return [command for line, block in bash_blocks(path) for command in block_commands(block, line, where)]


def section_commands(path: Path, heading: str) -> list[DocCommand]:
    """The commands of the ```bash blocks under `heading` (up to the next heading of any level)."""
    text = path.read_text(encoding="utf-8")
    start, section = _section(text, heading, path.name)
    where = str(path.relative_to(REPO))
    commands = []
    for match in _FENCE.finditer(section):
        line = text.count("\n", 0, start + match.start(1)) + 1
        commands += block_commands(match.group(1), line, where)
    return commands


def python_blocks(path: Path, heading: str) -> list[str]:
    """The ```python blocks under `heading` (up to the next heading)."""
    _, section = _section(path.read_text(encoding="utf-8"), heading, path.name)
    return re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
