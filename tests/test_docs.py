"""The docs say what the code and the benches say: the bench tables are the results files',
every link between the pages leads somewhere, and the README stays a short manual."""

from __future__ import annotations

import re

import pytest

from bench import doctables
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_bench_table_in_the_docs_is_what_the_results_files_say():
    blocks = doctables.blocks()
    assert {name for _, name in blocks} >= {"summary:quality", "summary:speed", "speed", "rerun", "scale",
                                            "quality:ml-latest-small"}
    for (path, name), expected in blocks.items():
        assert doctables.block(path.read_text(), name) == expected, (
            f"{path.name}'s '{name}' table differs from bench/results/: run `python bench/doctables.py`")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_between_the_pages_leads_to_a_file_and_heading_that_exist(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if fragment and linked.suffix == ".md":
            headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.MULTILINE)}
            assert fragment in headings, f"{page.name} links to {target}: no such heading in {linked.name}"


def test_the_readme_is_a_short_manual_that_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "run"], ["make", "test"]]
