"""The design and the measurements live in ``docs/``; code, tests and docs cite them as ``docs/<file>.md, "<section>"``
(the heading or the bold lead-in of a paragraph). A citation must name text that the cited file still holds, so a
newcomer who follows one finds it -- also after a section moves (the carve's measurement log moved from the README
to docs/CARVING.md)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO

CITATION = re.compile(r'(docs/[A-Z]+\.md),?\s+"([^"]+)"')


def cited_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=REPO, capture_output=True, text=True, check=True)
    return listed.stdout.split()


def flattened(text: str) -> str:
    """One line of words: comment markers at line starts (``#``, ``#:``) and line breaks removed."""
    return " ".join(re.sub(r"^\s*#:?", " ", text, flags=re.M).split())


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout")
def test_every_docs_citation_names_a_section_the_file_holds() -> None:
    docs = {path.relative_to(REPO).as_posix(): flattened(path.read_text(encoding="utf-8"))
            for path in (REPO / "docs").glob("*.md")}
    missing, seen = [], 0
    for name in cited_files():
        for match in CITATION.finditer(flattened((REPO / name).read_text(encoding="utf-8"))):
            seen += 1
            doc, section = match.group(1), match.group(2)
            if doc not in docs or section not in docs[doc]:
                missing.append(f"{name}: {doc}, \"{section}\"")
    assert seen > 50, "the citation pattern no longer matches how the code cites docs"
    assert not missing, "\n".join(missing)
