"""The MLflow UI, driven by headless Chromium, shows a registered drafter, its `champion` alias and its metrics.

A real MLflow server (the `mlflow_server` fixture: SQLite, proxied artifacts) gets a tiny drafter
through `draftsmith.registry.DrafterRegistry`, promoted to champion. Chromium (Debian's `chromium`
package, no PyPI driver, no downloaded browser) renders the React SPA with a virtual-time budget:
`--dump-dom` gives the rendered DOM to assert on, `--screenshot` the pictures saved as test artifacts
under test-artifacts/mlflow_ui/ (gitignored).

The browser: `chromium` (or `chromium-browser`, `google-chrome`) on PATH, else /usr/bin/chromium. CI (`CI=true`,
which `.ci/run` installs chromium for) FAILS without one, so the test cannot go silently missing there; elsewhere
it is skipped, with the reason in `pytest -ra`'s summary (`make test` passes -ra): `apt-get install -y chromium`.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "mlflow_ui"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
ACCEPTANCE, TOKEN_ACCEPTANCE = 0.4321, 0.6125

pytestmark = pytest.mark.integration


def find_browser() -> Path | None:
    """The headless browser to drive: the first of BROWSERS on PATH, else /usr/bin/chromium, else None."""
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found:
        return Path(found)
    fallback = Path("/usr/bin/chromium")
    return fallback if fallback.exists() else None


def missing_browser_verdict(browser: Path | None, environ=os.environ) -> tuple[str, str] | None:
    """None when a browser is there; else ("fail" in CI, "skip" elsewhere, the reason)."""
    if browser is not None:
        return None
    reason = (f"no headless Chromium ({', '.join(BROWSERS)} on PATH or /usr/bin/chromium): the MLflow UI browser test "
              "needs one (apt-get install -y chromium; .ci/run installs it)")
    return ("fail" if environ.get("CI", "").lower() in ("true", "1") else "skip"), reason


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Session-scoped, so that it runs before (and instead of) starting the MLflow server when there is no browser."""
    browser = find_browser()
    verdict = missing_browser_verdict(browser)
    if verdict is not None:
        action, reason = verdict
        (pytest.fail if action == "fail" else pytest.skip)(reason)
    return browser


def _chromium(tmp_path: Path, url: str, *action: str, budget_ms: int,
              size: str = "1400,900") -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{uuid.uuid4().hex[:6]}"  # fresh profile: no cache between pages
    cmd = [str(find_browser()), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
           f"--window-size={size}", *action, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def _visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def _render(tmp_path: Path, url: str, expected: list[str]) -> str:
    """The page's rendered text once every expected string shows (a busy machine may need a longer budget)."""
    text = ""
    for budget_ms in (10_000, 20_000, 40_000):
        text = _visible_text(_chromium(tmp_path, url, "--dump-dom", budget_ms=budget_ms).stdout)
        if all(e in text for e in expected):
            return text
    missing = [e for e in expected if e not in text]
    pytest.fail(f"{url} never showed {missing}; rendered text: {text[:1500]}")


def _screenshot(tmp_path: Path, url: str, name: str, size: str = "1400,900") -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / name
    out.unlink(missing_ok=True)
    _chromium(tmp_path, url, f"--screenshot={out}", budget_ms=15_000, size=size)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{out} is not a rendered page screenshot"
    return out


@pytest.fixture
def champion(mlflow_server, tmp_path, write_fake_drafter):
    """A tiny drafter registered on the test server with evaluation metrics, promoted to `champion`."""
    from draftsmith.registry import DrafterRegistry

    drafter_dir = write_fake_drafter(tmp_path / "drafter")
    registry = DrafterRegistry(mlflow_server.url, model_name=f"draftsmith-drafter-ui-{uuid.uuid4().hex[:6]}")
    version = registry.register_drafter(
        drafter_dir, experiment="draftsmith-distill-ui", run_name="distill-ui-test",
        tags={"target_id": "tiny-target", "loss": "fkl"},
        metrics={"heldout_acceptance_rate": ACCEPTANCE, "heldout_token_acceptance": TOKEN_ACCEPTANCE},
        params={"num_speculative_tokens": 4})
    registry.promote(version.version, reason="browser test")
    promoted = registry.get_version_by_alias("champion")
    assert promoted is not None and promoted.version == version.version
    experiment_id = registry.client.get_run(version.run_id).info.experiment_id
    return registry, promoted, experiment_id


def test_a_missing_browser_fails_in_ci_and_skips_elsewhere():
    """The verdict itself, whatever this machine has: CI must not skip the browser test silently."""
    assert missing_browser_verdict(Path("/usr/bin/chromium"), {"CI": "true"}) is None
    assert missing_browser_verdict(None, {"CI": "true"})[0] == "fail"
    assert missing_browser_verdict(None, {"CI": "1"})[0] == "fail"
    action, reason = missing_browser_verdict(None, {})
    assert action == "skip" and "apt-get install -y chromium" in reason


def test_mlflow_ui_shows_champion_drafter_and_metrics(chromium, mlflow_server, champion, tmp_path):
    registry, version, experiment_id = champion
    name = registry.model_name

    # The registered model's page: the version and its champion alias.
    model_url = f"{mlflow_server.url}/#/models/{name}"
    text = _render(tmp_path, model_url, [name, f"Version {version.version}", "champion"])
    assert re.search(rf"Version {version.version}\b.*@ ?champion", text), \
        f"the champion alias is not shown on version {version.version}: {text[:1500]}"
    shot = _screenshot(tmp_path, model_url, "registered_model_champion.png")

    # The models list links it too.
    _render(tmp_path, f"{mlflow_server.url}/#/models", [name])

    # The version's run: the evaluation metrics the gate reads.
    run_url = f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{version.run_id}"
    text = _render(tmp_path, run_url, ["heldout_acceptance_rate", str(ACCEPTANCE),
                                       "heldout_token_acceptance", str(TOKEN_ACCEPTANCE)])
    assert f"{name} v{version.version}" in text, "the run page should link the registered version"
    run_shot = _screenshot(tmp_path, run_url, "drafter_run_metrics.png", size="1400,1500")  # metrics table
    print(f"screenshots: {shot} {run_shot}")
