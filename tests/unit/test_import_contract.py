"""The layering contract, read from the source: every import statement, module- or function-level.

Data flows request -> record -> dataset -> job -> registry -> replica, and the imports follow it:
- the core library (platform/draftsmith) imports none of ray, serve, jobs, pipelines;
- jobs/ never imports pipelines/; pipelines/ never imports jobs/ (it reaches a job through its entry
  point, `python -m jobs.<name>`, submitted through the Ray Jobs API or run as a process);
- serve/ imports neither jobs/ nor pipelines/ (jobs/ and pipelines/ may import serve/).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = {  # folder -> (the package its modules belong to, the top-level modules it must not import)
    "platform/draftsmith": ("draftsmith", {"ray", "serve", "jobs", "pipelines"}),
    "jobs": ("jobs", {"pipelines"}),
    "pipelines": ("pipelines", {"jobs"}),
    "serve": ("serve", {"jobs", "pipelines"}),
}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, wherever it sits (functions included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def violations(source: str, package: str, forbidden: set[str]) -> list[str]:
    return [f"line {line}: {module}" for line, module in imported_modules(source, package)
            if module.split(".")[0] in forbidden]


def _modules():
    for folder, (package, forbidden) in LAYERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            yield pytest.param(path, package, forbidden, id=str(path.relative_to(REPO)))


@pytest.mark.parametrize("path,package,forbidden", list(_modules()))
def test_module_respects_the_layering(path, package, forbidden):
    bad = violations(path.read_text(), package, forbidden)
    assert not bad, f"{path.relative_to(REPO)} imports across the layering ({sorted(forbidden)} forbidden): {bad}"


def test_every_layer_has_modules():
    for folder in LAYERS:
        assert list((REPO / folder).rglob("*.py")), f"{folder} has no module: the contract checks nothing there"


@pytest.mark.parametrize("source,package,forbidden,expected", [
    # what jobs/distill.py and pipelines/trigger.py did before the layering was fixed: function-level imports
    ("def run():\n    from pipelines.dataset import build_distill_dataset\n", "jobs", {"pipelines"},
     ["line 2: pipelines.dataset"]),
    ("def read():\n    try:\n        from jobs.distill import serving_load\n    except ImportError:\n        pass\n",
     "pipelines", {"jobs"}, ["line 3: jobs.distill"]),
    ("import ray.train as t\n", "draftsmith", {"ray"}, ["line 1: ray.train"]),
    ("from serve import load\n", "draftsmith", {"serve"}, ["line 1: serve"]),
    ("from . import load\n", "serve", {"jobs"}, []),
    ("from ..jobs import distill\n", "serve.sub", {"jobs"}, []),  # serve.jobs: relative stays inside serve
    ("from raydium import x\nimport rayon\n", "draftsmith", {"ray"}, []),  # names that merely start with ray
])
def test_the_scan_catches_what_it_must(source, package, forbidden, expected):
    assert violations(source, package, forbidden) == expected
