"""Start a real local MLflow tracking server (embedded default and tests).

What it does: runs ``python -m mlflow server`` as a subprocess in its own process
group with a SQLite backend store (``<state>/mlflow.db``) and proxied artifact
serving (``--serve-artifacts --artifacts-destination <state>/artifacts``), so
clients upload and download artifacts through the server URL only (the same as
a remote server; no shared filesystem assumed). Waits, bounded, for ``/health``
and logs the server's output to ``<state>/mlflow.log``.

What it does not do: talk to the tracking API (that is ``draftsmith.registry``),
or manage a production server (PostgreSQL, object store: see ``infra/``).

mlflow 3.x notes: the server runs uvicorn by default; ``--workers 1`` keeps one
process; the host-header security middleware allows localhost and private IPs
by default, which is all a local server needs, so it is left on. Server-side job
execution (GenAI evaluation jobs; a drafter registry needs none) is turned off
with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false in the child's environment: fewer
processes, faster start.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from draftsmith.ports import free_port

logger = logging.getLogger(__name__)


class MlflowServerError(RuntimeError):
    """The local MLflow server did not start (or died)."""


def _log_tail(path: Path, n_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "<no log>"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class MlflowServer:
    """Handle on a running server: ``.url``, ``.stop()``, usable as a context manager."""

    url: str
    state_dir: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def log_path(self) -> Path:
        return self.state_dir / "mlflow.log"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and all its workers (the whole process group)."""
        if self.process.poll() is not None:
            return
        pgid = self.process.pid  # started with start_new_session: pgid == pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        # uvicorn workers may outlive the parent briefly; make sure none are left.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        logger.info("MLflow server at %s stopped", self.url)

    def __enter__(self) -> "MlflowServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_mlflow_server(
    state_dir: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    startup_timeout: float = 60.0,
) -> MlflowServer:
    """Start ``mlflow server`` on SQLite under ``state_dir`` and wait until ``/health`` answers."""
    state_dir = Path(state_dir).resolve()
    (state_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination", str(state_dir / "artifacts"),
        "--host", host,
        "--port", str(port),
        "--workers", "1",
    ]
    log_path = state_dir / "mlflow.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=state_dir, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    server = MlflowServer(url=url, state_dir=state_dir, process=proc)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MlflowServerError(
                f"MLflow server exited with code {proc.returncode} before becoming healthy "
                f"(command: {' '.join(cmd)}). Tail of {log_path}:\n{_log_tail(log_path)}"
            )
        if _healthy(url):
            logger.info("MLflow server up at %s (state %s)", url, state_dir)
            return server
        time.sleep(0.25)
    server.stop()
    raise MlflowServerError(
        f"MLflow server at {url} not healthy after {startup_timeout:.0f}s; is port {port} taken? "
        f"Tail of {log_path}:\n{_log_tail(log_path)}"
    )
