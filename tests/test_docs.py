"""The documentation stays inside the repository: every link in README.md and docs/ names a file here."""
from __future__ import annotations

import re

from tests.peers import REPO_ROOT

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_relative_link_names_a_file_of_the_repository():
    documents = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    broken = []
    for document in documents:
        for target in LINK.findall(document.read_text()):
            if "://" in target:
                continue
            path = (document.parent / target).resolve()
            if not path.is_relative_to(REPO_ROOT.resolve()) or not path.exists():
                broken.append(f"{document.name}: {target}")
    assert not broken, broken
    assert (REPO_ROOT / "docs" / "architecture.md").exists()
