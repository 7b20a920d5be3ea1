"""What users read: every file they see (README, RESULTS, docs/, the modules, benchmarks, requirements, the
commands' --help) cites no issue number from the project's tracker, which users cannot see; and the
README stays the front door it is meant to be (under 15 KB, its commands' files present)."""
import re

import pytest

import config
from conftest import ROOT

USER_FACING = sorted({*ROOT.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.py"),
                      *ROOT.glob("requirements*.txt"), ROOT / ".ci" / "run", ROOT / ".ci" / "lock"})
ISSUE = re.compile(r"\bissues? #?\d+|\(the issue\b|#\d{2,}\b(?!\w)", re.IGNORECASE)


@pytest.mark.parametrize("path", USER_FACING, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_user_facing_file_cites_the_tracker(path):
    hits = [f"{path.name}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if ISSUE.search(line)]
    assert not hits, hits


def test_the_lint_finds_what_it_looks_for():
    assert ISSUE.search("as issue 24 asked") and ISSUE.search("(the issue left them open)")
    assert ISSUE.search("see #123") and not ISSUE.search("a 10% issue of numbers") and not ISSUE.search("x = 3")


def test_help_cites_no_issue_numbers():
    assert not ISSUE.search(config.build_parser().format_help())


def test_the_readme_is_under_15_kb_and_names_files_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 15_000
    for name in re.findall(r"`([\w/]+\.(?:py|md|txt))`", text):
        if name.startswith("my_"):                           # the user's own files in an example
            continue
        assert (ROOT / name).exists() or any(ROOT.glob(f"**/{name}")), name


def test_every_test_the_documentation_cites_exists():
    """docs/ and RESULTS.md cite tests as evidence: each name must be a test of the suite."""
    import ast

    defined = {n.name for p in (ROOT / "tests").glob("test_*.py") for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.FunctionDef)}
    cited = {name for p in [ROOT / "RESULTS.md", *ROOT.glob("docs/*.md")] if p.exists()
             for name in re.findall(r"\btest_[a-z0-9_]+\b(?!\.py)", p.read_text())}
    assert cited - defined == set()
