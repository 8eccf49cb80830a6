"""Docs that cannot drift: every relative link of the README and docs/ points to a file
that exists, and every path a module docstring names under docs/ exists."""

import re

from conftest import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_docs_pages_named_in_the_code_exist():
    named = set()
    for path in (REPO / "fairseq_seqlevel").rglob("*.py"):
        named.update(re.findall(r"docs/[\w/]+\.md", path.read_text()))
    assert named, "no docs page is named in the code"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, missing
