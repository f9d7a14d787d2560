"""The services `draftsmith demo` leaves running on this machine, and `draftsmith down`, which stops them.

What it does: starts a local Ray head node with `ray start --head --block` in its own process group
(so the cluster, its dashboard and the Serve application outlive the command that started them) and a
real MLflow tracking server (`draftsmith.mlflow_server`, SQLite backend, local artifact root), all
bound to 127.0.0.1, and records what it started in `<state>/services.json`; `stop_services` reads that
file and stops exactly those process groups (never `ray stop`, which stops every cluster on the machine).

The spare node: `start_spare_node` / `add_spare_node` join a second Ray node to that head (`ray start
--address ... --block`, its own process group, recorded in the same file, so `draftsmith down` stops it
too). It advertises no CPU and `draftsmith_spare: <slots>`: distillation (the job's driver and its Ray
Train workers) asks for `draftsmith_spare` and can only land there, and nothing that asks for CPU (Serve
replicas) can. The head carries no `draftsmith_spare`. Both nodes see this machine's filesystem, so shared
state (traffic log, job state, checkpoints) may be plain absolute paths; on a real cluster it must be an
object-store URI or a shared volume (infra/kuberay/).

What it does not do: deploy anything on the cluster (pipelines/demo.py does), manage remote clusters
(`infra/` has the KubeRay and cluster-launcher manifests), pin zero-CPU actors (Serve's proxy, ingress)
to the head, or stop services it did not start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from draftsmith.ports import LOOPBACK, free_port, pick_port

logger = logging.getLogger(__name__)

SERVICES_FILE = "services.json"
# The custom resource of spare compute: only spare nodes have it (infra/kuberay/, infra/ray-cluster.yaml
# name the same one), so work that asks for it can never take the serving node's capacity.
SPARE_RESOURCE = "draftsmith_spare"
# SIGTERM to SIGKILL for a Ray node's process group: `ray stop --grace-period`'s default. The daemons stop within
# a second or two of SIGTERM; some then take about half a minute to exit (the GCS server among them).
RAY_STOP_GRACE_S = 16.0
# A node label for selectors (`label_selector={"draftsmith.io/pool": "spare"}` or "!spare").
SPARE_LABEL = ("draftsmith.io/pool", "spare")


class ServiceError(RuntimeError):
    """A local service could not be started; the message says which and where its log is."""


@dataclasses.dataclass
class SpareNode:
    """A Ray node that joined the head to lend spare compute (`start_spare_node`)."""

    node_id: str  # Ray node id (hex), what ray.get_runtime_context().get_node_id() returns there
    node_name: str  # unique `--node-name`, how its joining is recognised
    pgid: int  # process group of its `ray start --address ... --block`
    resources: dict[str, float]  # what it advertises, CPU included (0)
    log: str  # its `ray start` log


@dataclasses.dataclass
class LocalServices:
    """What is running: the Ray GCS address, its dashboard, the MLflow server, and who started them."""

    ray_address: str  # GCS address, for ray.init(address=...)
    dashboard_url: str  # Ray dashboard and Jobs API
    mlflow_url: str
    mlflow_pgid: int | None  # process group of the MLflow server we started (None: not ours)
    ray_pgid: int | None  # process group of `ray start --head --block` (None: not ours)
    spare_nodes: list[SpareNode] = dataclasses.field(default_factory=list)  # joined by add_spare_node

    def write(self, state_dir: Path) -> None:
        path = Path(state_dir) / SERVICES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def read(cls, state_dir: Path) -> "LocalServices | None":
        path = Path(state_dir) / SERVICES_FILE
        try:
            data = json.loads(path.read_text())
            # A file written before spare nodes existed has no `spare_nodes`: the default (none) applies.
            spares = [SpareNode(**node) for node in data.pop("spare_nodes", None) or []]
            return cls(**data, spare_nodes=spares)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as error:
            logger.warning("ignoring unreadable %s: %s", path, error)
            return None


def _ray_cli() -> list[str]:
    # The `ray` script of this interpreter's environment (a venv's bin/ may not be on PATH).
    script = Path(sys.executable).parent / "ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def start_ray_head(state_dir: Path, *, num_cpus: int, dashboard_port: int = 8265, gcs_port: int | None = None,
                   timeout_s: float = 120.0) -> tuple[str, str, int]:
    # Ports 10002-19999 are Ray's worker ports: keep the dashboard and GCS outside them.
    """`ray start --head --block` on loopback in its own process group; returns (GCS address, dashboard URL,
    process group id). Stopping that process group stops exactly this cluster (`ray stop` would stop every
    Ray cluster of this user on the machine, a test suite's included)."""
    # The GCS port is recorded, never typed by a user: a free one, not Ray's default 6379, which a cluster started
    # at the same moment (a test session's `ray.init()`) may also find free and take.
    gcs_port = free_port() if gcs_port is None else pick_port(gcs_port)
    dashboard_port = pick_port(dashboard_port)
    log_path = Path(state_dir) / "ray-head.log"
    cmd = _ray_cli() + ["start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={gcs_port}",
                        f"--num-cpus={num_cpus}", "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
                        f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
                        # Fixed by default, and a cluster started later with the defaults (`ray.init()`, a test
                        # session's) would find them taken (its job agent fails to bind): never take Ray's defaults.
                        f"--ray-client-server-port={free_port()}",
                        f"--dashboard-agent-listen-port={free_port()}",
                        f"--temp-dir={ray_temp_dir(state_dir)}"]
    # Ray >= 2.5x turns on token authentication for `ray start`; clients of this process (ray.init, the Jobs
    # API) must then run in token mode too. The token lives in ~/.ray/auth_token (never logged here).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    _ensure_auth_token(env)
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


def ray_temp_dir(state_dir: Path, node_name: str = "head") -> str:
    """A node's own Ray temp dir (the head's, or the node called `node_name`, for `state_dir`). Under the shared
    default (/tmp/ray) the Jobs API resolves a job driver's cluster from /tmp/ray/ray_current_cluster, which
    names the cluster started LAST on the machine: a test session's or a benchmark's cluster started after this
    one would receive this cluster's job drivers. Each node has its own: nodes sharing one would share the
    folder where each unpacks a job's uploaded code, and the head re-extracting a package deletes the working
    dir of a driver running on the spare node. Short (under /tmp) because Ray's socket paths live inside."""
    digest = hashlib.sha1(f"{Path(state_dir).resolve()}:{node_name}".encode()).hexdigest()[:10]
    return str(Path(tempfile.gettempdir()) / f"draftsmith-ray-{digest}")


def _ensure_auth_token(env: dict[str, str]) -> None:
    """Create ~/.ray/auth_token when token mode is on and no token exists: `ray start` refuses to start without
    one (only `ray.init()` creates it), so a fresh machine's first cluster would fail. The CLI prints the token:
    its output is discarded, never logged."""
    if env.get("RAY_AUTH_MODE") != "token" or env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").exists():
        return
    result = subprocess.run(_ray_cli() + ["get-auth-token", "--generate"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, timeout=120)
    if result.returncode != 0:
        raise ServiceError(f"could not create a Ray auth token (`ray get-auth-token --generate`): "
                           f"{result.stderr.decode(errors='replace')[-500:]}")


def spare_node_command(head_address: str, *, node_name: str, slots: float, temp_dir: str | None = None,
                       object_store_memory: int | None = None) -> list[str]:
    """The `ray start` command line of a spare node joining `head_address` (GCS host:port) on loopback;
    `temp_dir`: the node's own (`ray_temp_dir(state_dir, node_name)`): its `ray_current_cluster` names this
    cluster for the job drivers placed here, and its unpacked job packages are its own."""
    cmd = _ray_cli() + [
        "start", f"--address={head_address}", "--block", f"--node-ip-address={LOOPBACK}",
        f"--node-name={node_name}",
        # No CPU: Ray Serve spreads replicas (which ask for CPU) over every node that has some; with none,
        # only work asking for SPARE_RESOURCE (or nothing at all) can be placed here.
        "--num-cpus=0", "--num-gpus=0",
        f"--resources={json.dumps({SPARE_RESOURCE: int(slots) if float(slots).is_integer() else slots})}",
        f"--labels={SPARE_LABEL[0]}={SPARE_LABEL[1]}",
        # Fixed by default (52365); the head on this machine may hold it already.
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]
    if temp_dir is not None:
        cmd.append(f"--temp-dir={temp_dir}")
    if object_store_memory is not None:
        cmd.append(f"--object-store-memory={int(object_store_memory)}")
    return cmd


def _joined_node_id(dashboard_url: str, node_name: str) -> str | None:
    """The id of the ALIVE node called `node_name` in the cluster of `dashboard_url`, if it has joined."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=dashboard_url, filters=[("node_name", "=", node_name)],
                           raise_on_missing_output=False, timeout=10)
    except Exception as error:  # the dashboard may be busy or restarting: ask again
        logger.debug("listing nodes at %s: %s", dashboard_url, error)
        return None
    alive = [n for n in nodes if n.state == "ALIVE"]
    return alive[0].node_id if alive else None


def start_spare_node(state_dir: Path, *, head_address: str, dashboard_url: str, slots: float = 2,
                     object_store_memory: int | None = None, timeout_s: float = 120.0) -> SpareNode:
    """Join a spare node to the head at `head_address` (`ray start --address ... --block`, own process group);
    returns it once the head lists it ALIVE. `slots` units of SPARE_RESOURCE: the local distillation job needs
    one for its driver (the trigger's entrypoint_resources) and one per Ray Train worker. Raises ServiceError
    (and stops what it started) when the node exits or does not join within `timeout_s`."""
    import secrets

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    node_name = f"draftsmith-spare-{secrets.token_hex(4)}"
    log_path = state_dir / f"ray-{node_name}.log"
    cmd = spare_node_command(head_address, node_name=node_name, slots=slots,
                             temp_dir=ray_temp_dir(state_dir, node_name),
                             object_store_memory=object_store_memory)
    # The head runs with token authentication (start_ray_head); the node and this process's probe need it too.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise ServiceError(f"the spare node {node_name} exited (status {process.returncode}) before "
                                   f"joining the Ray head at {head_address}; log: {log_path}\n{_tail(log_path)}")
            node_id = _joined_node_id(dashboard_url, node_name)
            if node_id:
                break
            if time.monotonic() > deadline:
                raise ServiceError(f"the spare node {node_name} did not join the Ray head at {head_address} "
                                   f"within {timeout_s:.0f} s; log: {log_path}\n{_tail(log_path)}")
            time.sleep(1.0)
    except BaseException:
        _stop_group(process.pid, timeout_s=30)
        raise
    return SpareNode(node_id=node_id, node_name=node_name, pgid=process.pid,
                     resources={"CPU": 0.0, SPARE_RESOURCE: float(slots)}, log=str(log_path))


def add_spare_node(state_dir: Path, *, slots: float = 2, object_store_memory: int | None = None,
                   timeout_s: float = 120.0) -> SpareNode:
    """Join a spare node to the cluster recorded in `<state_dir>/services.json` and record it there, so that
    `stop_services` (`draftsmith down`) stops it with the head."""
    state_dir = Path(state_dir).resolve()
    services = LocalServices.read(state_dir)
    if services is None or not services.ray_address:
        raise ServiceError(f"no local Ray head recorded under {state_dir} ({SERVICES_FILE}): start one first "
                           "(start_services, `draftsmith demo`)")
    node = start_spare_node(state_dir, head_address=services.ray_address, dashboard_url=services.dashboard_url,
                            slots=slots, object_store_memory=object_store_memory, timeout_s=timeout_s)
    services = LocalServices.read(state_dir) or services  # re-read: another node may have been recorded since
    services.spare_nodes.append(node)
    services.write(state_dir)
    return node


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop_group(pgid: int, *, timeout_s: float) -> bool:
    """SIGTERM a process group, then SIGKILL what is left after `timeout_s`; False if it was already gone."""
    return pgid in _stop_groups([pgid], timeout_s=timeout_s)


def _stop_groups(pgids: list[int], *, timeout_s: float) -> set[int]:
    """SIGTERM these process groups together, then SIGKILL what is left after `timeout_s`; returns those that
    existed. Together, because each Ray node takes tens of seconds to wind down after SIGTERM."""
    signalled = set()
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGTERM)
            signalled.add(pgid)
        except ProcessLookupError:
            pass
    left = _wait_groups(signalled, timeout_s)
    for pgid in left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_groups(left, 10.0)  # SIGKILL is not waited for by the kernel: reap, so that callers see them gone
    return signalled


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is alive. When this process started the group (the demo without
    --leave-up, a test), its leader stays a zombie, and the group "alive", until reaped here."""
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_groups(pgids: set[int], timeout_s: float) -> set[int]:
    """Wait until these process groups are empty or `timeout_s` passed; returns those left."""
    left = set(pgids)
    deadline = time.monotonic() + timeout_s
    while left:
        for pgid in list(left):
            if not group_alive(pgid):
                left.discard(pgid)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    return left


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
                   dashboard_port: int = 8265, spare_slots: float = 0) -> LocalServices:
    """A Ray head and an MLflow server on loopback, recorded in `<state_dir>/services.json`; with
    `spare_slots` > 0, also a spare node (`add_spare_node`) with that many units of SPARE_RESOURCE."""
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
    if spare_slots > 0:
        try:
            add_spare_node(state_dir, slots=spare_slots)
        except Exception:
            stop_services(state_dir)
            raise
        services = LocalServices.read(state_dir)
    return services


def stop_services(state_dir: Path) -> list[str]:
    """Stop what `start_services` recorded under `state_dir`; returns what was stopped (for the user)."""
    state_dir = Path(state_dir).resolve()
    services = LocalServices.read(state_dir)
    if services is None:
        return []
    stopped = []
    # The head and its spare nodes at once: one grace period for the whole cluster.
    ray_groups = [node.pgid for node in services.spare_nodes if node.pgid]
    ray_groups += [services.ray_pgid] if services.ray_pgid else []
    gone = _stop_groups(ray_groups, timeout_s=RAY_STOP_GRACE_S)
    for node in services.spare_nodes:
        if node.pgid in gone:
            stopped.append(f"Ray spare node {node.node_name} ({node.node_id[:12]})")
    if services.ray_pgid in gone:
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


def spare_main(argv: list[str] | None = None) -> int:
    """`draftsmith spare [--state-dir DIR] [--slots N]`: join a spare node to the recorded local head."""
    import argparse

    parser = argparse.ArgumentParser(prog="draftsmith spare",
                                     description="Join a spare Ray node (resource draftsmith_spare, no CPU) to the "
                                                 "local head that `draftsmith demo` left running.")
    parser.add_argument("--state-dir", default=".state/demo", help="the folder holding services.json")
    parser.add_argument("--slots", type=int, default=2,
                        help=f"units of {SPARE_RESOURCE}: 1 for a job's driver + 1 per Ray Train worker")
    parser.add_argument("--timeout-s", type=float, default=120, help="how long to wait for the node to join")
    args = parser.parse_args(argv)
    node = add_spare_node(Path(args.state_dir), slots=args.slots, timeout_s=args.timeout_s)
    print(f"spare node {node.node_name} joined as {node.node_id} with {node.resources}; "
          f"`draftsmith down --state-dir {args.state_dir}` stops it with the head")
    return 0
