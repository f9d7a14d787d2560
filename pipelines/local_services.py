"""The services `draftsmith demo` leaves running on this machine, and `draftsmith down`, which stops them.

What it does: starts a local Ray head node with `ray start --head --block` in its own process group
(so the cluster, its dashboard and the Serve application outlive the command that started them) and a
real MLflow tracking server (`draftsmith.mlflow_server`, SQLite backend, local artifact root), all
bound to 127.0.0.1, and records what it started in `<state>/services.json`; `stop_services` reads that
file and stops exactly those process groups (never `ray stop`, which stops every cluster on the machine).

What it does not do: deploy anything on the cluster (pipelines/demo.py does), manage remote clusters
(`infra/` has the KubeRay and cluster-launcher manifests), or stop services it did not start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from draftsmith.ports import LOOPBACK, pick_port

logger = logging.getLogger(__name__)

SERVICES_FILE = "services.json"


class ServiceError(RuntimeError):
    """A local service could not be started; the message says which and where its log is."""


@dataclasses.dataclass
class LocalServices:
    """What is running: the Ray GCS address, its dashboard, the MLflow server, and who started them."""

    ray_address: str  # GCS address, for ray.init(address=...)
    dashboard_url: str  # Ray dashboard and Jobs API
    mlflow_url: str
    mlflow_pgid: int | None  # process group of the MLflow server we started (None: not ours)
    ray_pgid: int | None  # process group of `ray start --head --block` (None: not ours)

    def write(self, state_dir: Path) -> None:
        path = Path(state_dir) / SERVICES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def read(cls, state_dir: Path) -> "LocalServices | None":
        path = Path(state_dir) / SERVICES_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as error:
            logger.warning("ignoring unreadable %s: %s", path, error)
            return None


def _ray_cli() -> list[str]:
    # The `ray` script of this interpreter's environment (a venv's bin/ may not be on PATH).
    script = Path(sys.executable).parent / "ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def start_ray_head(state_dir: Path, *, num_cpus: int, dashboard_port: int = 8265, gcs_port: int = 6379,
                   timeout_s: float = 120.0) -> tuple[str, str, int]:
    # Ports 10002-19999 are Ray's worker ports: keep the dashboard and GCS outside them.
    """`ray start --head --block` on loopback in its own process group; returns (GCS address, dashboard URL,
    process group id). Stopping that process group stops exactly this cluster (`ray stop` would stop every
    Ray cluster of this user on the machine, a test suite's included)."""
    gcs_port = pick_port(gcs_port)
    dashboard_port = pick_port(dashboard_port)
    log_path = Path(state_dir) / "ray-head.log"
    cmd = _ray_cli() + ["start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={gcs_port}",
                        f"--num-cpus={num_cpus}", "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
                        f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
                        # Fixed by default; another cluster on this machine (a test session's) may hold them.
                        f"--ray-client-server-port={pick_port(10001)}",
                        f"--dashboard-agent-listen-port={pick_port(52365)}"]
    # Ray >= 2.5x turns on token authentication for `ray start`; clients of this process (ray.init, the Jobs
    # API) must then run in token mode too. The token lives in ~/.ray/auth_token (never logged here).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
    address, url = f"{LOOPBACK}:{gcs_port}", f"http://{LOOPBACK}:{dashboard_port}"
    try:
        _wait_http(f"{url}/api/version", timeout_s, what=f"the Ray dashboard at {url} (log: {log_path})",
                   alive=lambda: process.poll() is None)
    except ServiceError:
        _stop_group(process.pid, timeout_s=30)
        raise
    return address, url, process.pid


def _stop_group(pgid: int, *, timeout_s: float) -> bool:
    """SIGTERM a process group, then SIGKILL what is left after `timeout_s`; False if it was already gone."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _wait_http(url: str, timeout_s: float, *, what: str, alive=lambda: True) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise ServiceError(f"{what} exited before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (Ray's token authentication may say 401 to an anonymous probe)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ServiceError(f"{what} did not answer within {timeout_s:.0f} s")


def start_services(state_dir: Path, *, num_cpus: int, mlflow_port: int = 5000,
                   dashboard_port: int = 8265) -> LocalServices:
    """A Ray head and an MLflow server on loopback, recorded in `<state_dir>/services.json`."""
    from draftsmith.mlflow_server import start_mlflow_server

    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    server = start_mlflow_server(state_dir / "mlflow", port=pick_port(mlflow_port))
    services = LocalServices(ray_address="", dashboard_url="", mlflow_url=server.url,
                             mlflow_pgid=server.process.pid, ray_pgid=None)
    services.write(state_dir)  # so `draftsmith down` can stop MLflow even if Ray fails to start
    try:
        address, url, pgid = start_ray_head(state_dir, num_cpus=num_cpus, dashboard_port=dashboard_port)
    except Exception:
        server.stop()
        raise
    services = dataclasses.replace(services, ray_address=address, dashboard_url=url, ray_pgid=pgid)
    services.write(state_dir)
    return services


def stop_services(state_dir: Path) -> list[str]:
    """Stop what `start_services` recorded under `state_dir`; returns what was stopped (for the user)."""
    state_dir = Path(state_dir).resolve()
    services = LocalServices.read(state_dir)
    if services is None:
        return []
    stopped = []
    if services.ray_pgid and _stop_group(services.ray_pgid, timeout_s=60):
        stopped.append(f"Ray cluster {services.ray_address} (dashboard {services.dashboard_url})")
    if services.mlflow_pgid and _stop_group(services.mlflow_pgid, timeout_s=15):
        stopped.append(f"MLflow server {services.mlflow_url}")
    (state_dir / SERVICES_FILE).unlink(missing_ok=True)
    return stopped


def main(argv: list[str] | None = None) -> int:
    """`draftsmith down [--state-dir DIR]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="draftsmith down", description="Stop what `draftsmith demo` left running.")
    parser.add_argument("--state-dir", default=".state/demo", help="the demo's state folder")
    args = parser.parse_args(argv)
    stopped = stop_services(Path(args.state_dir))
    print("stopped: " + "; ".join(stopped) if stopped else f"nothing recorded under {args.state_dir}: nothing to stop")
    return 0
