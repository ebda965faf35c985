"""The Markdown pages: every relative link and image points at a file of the checkout."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
    os.path.relpath(p, ROOT)
    for pattern in ("*.md", "docs/*.md", "benchmarks/*.md", "results/**/README.md")
    for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_pages_are_found():
    assert {"README.md", "benchmarks/README.md", "results/batch_size_study/README.md"} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_exists(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    targets = [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    missing = [
        t for t in targets if t and not os.path.exists(os.path.join(ROOT, os.path.dirname(page), t))
    ]
    assert not missing, f"{page} links to files that do not exist: {missing}"
