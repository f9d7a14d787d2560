"""The project's docs stay true to the repository: generated pages current, links resolving, nothing outside.

- docs/configuration.md is what docs/render_configuration.py renders from the models today;
- no file of the project refers to a file outside the repository (the design lives in docs/design.md);
- README.md stays the short entry point, and every docs/ page it names exists;
- every Makefile target declared .PHONY has a rule, and CI runs the README's test command.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 150
# Spelled in pieces so that this file does not match its own check.
OUTSIDE_REFERENCES = re.compile("|".join([r"\bDESIGN" + r"\.md\b", r"\bANCHORS" + r"\.md\b",
                                          r"\.\./" + "shared", "/work" + "/shared"]))
SKIP_DIRS = {".git", ".venv", ".state", "__pycache__", ".pytest_cache", "build", "dist", "test-artifacts"}


def _renderer():
    spec = importlib.util.spec_from_file_location("render_configuration", DOCS / "render_configuration.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _project_files() -> list[Path]:
    """Tracked files plus new ones git does not ignore; a plain walk where there is no git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True, timeout=60).stdout
        paths = [REPO / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        paths = []
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            paths += [Path(root) / f for f in files]
    return [p for p in paths if p.is_file()]


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary
    return data.decode("utf-8", errors="replace")


def test_configuration_page_is_current():
    renderer = _renderer()
    rendered = renderer.render()
    committed = (DOCS / "configuration.md").read_text()
    assert committed == rendered, (f"docs/configuration.md is stale: run `{renderer.COMMAND}` (make docs) "
                                   "and commit the result")


def test_no_file_refers_outside_the_repository():
    offenders = []
    for path in _project_files():
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_REFERENCES.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not offenders, ("these lines refer to files outside the repository; cite docs/design.md (or the "
                           "page that holds it) instead:\n" + "\n".join(offenders))


def test_readme_is_the_short_entry_point():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
                                            "move detail into docs/")
    text = "\n".join(lines)
    for command in ("make demo", "make test", "make down"):
        assert command in text, f"README.md no longer names `{command}`"


def _links(text: str) -> set[str]:
    """Relative link targets (`path` or `path#anchor`) and docs/ paths named in code spans."""
    links = set(re.findall(r"\]\(([^)\s]+)\)", text))
    links |= set(re.findall(r"`((?:\.\./)?docs/[\w./-]+)`", text))
    return {link for link in links if not re.match(r"[a-z]+:", link)}


def _link_targets(text: str) -> set[str]:
    return {link.split("#", 1)[0] for link in _links(text)} - {""}


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_docs_links_exist():
    targets = _link_targets(README.read_text())
    assert any(t.startswith("docs/") for t in targets), "README.md should point into docs/"
    missing = sorted(t for t in targets if not (REPO / t).exists())
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")) + ["../README.md"])
def test_docs_links_and_anchors_exist(page):
    source = (DOCS / page).resolve()
    broken = []
    for link in sorted(_links(source.read_text())):
        path, _, anchor = link.partition("#")
        target = source if not path else next((p for p in (source.parent / path, REPO / path) if p.exists()), None)
        if target is None:
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
            broken.append(f"{link} (no heading with that anchor)")
    assert not broken, f"{source.relative_to(REPO)} has broken links: {broken}"


def test_every_phony_make_target_has_a_rule():
    makefile = (REPO / "Makefile").read_text()
    phony = set()
    for line in re.findall(r"^\.PHONY:(.*)$", makefile, flags=re.M):
        phony |= set(line.split())
    rules = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", makefile, flags=re.M))
    assert not phony - rules, f"Makefile declares .PHONY targets without a rule: {sorted(phony - rules)}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in README.read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test\s*$", ci, flags=re.M), ".ci/run must run `make test`, the README's command"
