"""pipelines/local_services.py without Ray: the spare node's command line, its record in services.json, the
errors when it does not join, and `stop_services` (`draftsmith down`) stopping every recorded process group.

The `ray` CLI is replaced by small Python processes (real processes in their own sessions, so stopping them is
real) and the head's node listing by a fake; tests/integration/test_two_node.py starts the real nodes.
Detects: a spare node that would advertise CPU (Serve replicas would then land on it) or lack the spare
resource, an old services.json no longer readable, a node that never joins waited on forever or left running,
a failed start without its log, and `down` forgetting the spare node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pipelines import local_services as ls
from pipelines.local_services import group_alive


def _sleeper() -> int:
    """A process in its own session, like `ray start --block`; returns its process group id."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True).pid


@pytest.fixture
def fake_ray(monkeypatch, tmp_path):
    """`ray` replaced by `python -c <script>`; the script records its pid in tmp_path/pid."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")

    def use(script: str):
        code = f"import os; open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); {script}"
        monkeypatch.setattr(ls, "_ray_cli", lambda: [sys.executable, "-c", code])

    return use


def _pid(tmp_path) -> int:
    deadline = time.monotonic() + 30
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        assert time.monotonic() < deadline, "the fake ray never started"
        time.sleep(0.05)
    return int((tmp_path / "pid").read_text())


def test_spare_node_command_advertises_only_the_spare_resource():
    cmd = ls.spare_node_command("127.0.0.1:6380", node_name="draftsmith-spare-x", slots=3, temp_dir="/tmp/ds-ray-x")
    args = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    assert "--head" not in cmd and "--block" in cmd and cmd[cmd.index("--block") - 2] == "start"
    assert args["--address"] == "127.0.0.1:6380" and args["--node-ip-address"] == "127.0.0.1"
    assert args["--num-cpus"] == "0" and args["--num-gpus"] == "0", "CPUs on the spare node would attract Serve"
    assert json.loads(args["--resources"]) == {ls.SPARE_RESOURCE: 3}
    assert args["--labels"] == f"{ls.SPARE_LABEL[0]}={ls.SPARE_LABEL[1]}"
    assert args["--node-name"] == "draftsmith-spare-x"
    assert args["--temp-dir"] == "/tmp/ds-ray-x", "the node's own temp dir: job drivers there must find this cluster"
    assert 0 < int(args["--dashboard-agent-listen-port"]) < 65536  # a free one: the head may hold 52365


def test_services_file_round_trip_and_old_files(tmp_path):
    node = ls.SpareNode(node_id="ab" * 28, node_name="draftsmith-spare-1", pgid=123,
                        resources={"CPU": 0.0, ls.SPARE_RESOURCE: 2.0}, log="/x.log")
    services = ls.LocalServices(ray_address="127.0.0.1:1", dashboard_url="http://127.0.0.1:2", mlflow_url="m",
                                mlflow_pgid=None, ray_pgid=7, spare_nodes=[node])
    services.write(tmp_path)
    assert ls.LocalServices.read(tmp_path) == services
    # services.json of a demo started before spare nodes existed
    old = {k: v for k, v in json.loads((tmp_path / ls.SERVICES_FILE).read_text()).items() if k != "spare_nodes"}
    (tmp_path / ls.SERVICES_FILE).write_text(json.dumps(old))
    assert ls.LocalServices.read(tmp_path).spare_nodes == []


def test_node_that_never_joins_is_an_error_and_is_stopped(fake_ray, monkeypatch, tmp_path):
    fake_ray("import time; print('waiting for the head'); time.sleep(120)")
    monkeypatch.setattr(ls, "_joined_node_id", lambda url, name: None)
    with pytest.raises(ls.ServiceError, match=r"did not join the Ray head at 127\.0\.0\.1:9 within 2 s") as error:
        ls.start_spare_node(tmp_path, head_address="127.0.0.1:9", dashboard_url="http://127.0.0.1:9", timeout_s=2)
    assert "ray-draftsmith-spare-" in str(error.value) and "waiting for the head" in str(error.value), \
        "the error must name the node's log and show its end"
    assert not group_alive(_pid(tmp_path)), "a node that did not join must not be left running"


def test_node_that_exits_is_an_error_with_its_log(fake_ray, monkeypatch, tmp_path):
    fake_ray("print('cannot reach the GCS'); raise SystemExit(3)")
    monkeypatch.setattr(ls, "_joined_node_id", lambda url, name: None)
    with pytest.raises(ls.ServiceError, match=r"exited \(status 3\)") as error:
        ls.start_spare_node(tmp_path, head_address="127.0.0.1:9", dashboard_url="http://127.0.0.1:9", timeout_s=60)
    assert "cannot reach the GCS" in str(error.value)


def test_add_spare_node_needs_a_recorded_head(tmp_path):
    with pytest.raises(ls.ServiceError, match="no local Ray head recorded"):
        ls.add_spare_node(tmp_path)


def test_spare_node_is_recorded_and_down_stops_it_with_the_head(fake_ray, monkeypatch, tmp_path):
    head = _sleeper()
    ls.LocalServices(ray_address="127.0.0.1:9", dashboard_url="http://127.0.0.1:9", mlflow_url="", mlflow_pgid=None,
                     ray_pgid=head).write(tmp_path)
    fake_ray("import time; time.sleep(120)")
    asked = []

    def joined(url, name):
        asked.append((url, name))
        return "cd" * 28 if len(asked) >= 2 else None  # listed on the second look

    monkeypatch.setattr(ls, "_joined_node_id", joined)
    node = ls.add_spare_node(tmp_path, slots=2, timeout_s=60)
    assert node.node_id == "cd" * 28 and node.pgid == _pid(tmp_path)
    assert node.resources == {"CPU": 0.0, ls.SPARE_RESOURCE: 2.0}
    assert asked[0] == ("http://127.0.0.1:9", node.node_name)
    assert ls.LocalServices.read(tmp_path).spare_nodes == [node]
    assert group_alive(node.pgid) and group_alive(head)

    stopped = ls.stop_services(tmp_path)
    assert len(stopped) == 2 and "spare node" in stopped[0] and "Ray cluster" in stopped[1], stopped
    assert not group_alive(node.pgid) and not group_alive(head)
    assert ls.LocalServices.read(tmp_path) is None


def test_down_kills_a_node_that_ignores_sigterm(monkeypatch, tmp_path):
    """After the grace period the group is SIGKILLed, and gone (its leader reaped) when stop_services returns."""
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
                                start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on
    ls.LocalServices(ray_address="127.0.0.1:9", dashboard_url="http://127.0.0.1:9", mlflow_url="", mlflow_pgid=None,
                     ray_pgid=stubborn.pid).write(tmp_path)
    monkeypatch.setattr(ls, "RAY_STOP_GRACE_S", 1.0)
    started = time.monotonic()
    assert len(ls.stop_services(tmp_path)) == 1
    assert time.monotonic() - started < 10
    assert not group_alive(stubborn.pid)


def test_draftsmith_spare_command(fake_ray, monkeypatch, tmp_path, capsys):
    """`draftsmith spare --state-dir D --slots 3` joins a node to D's recorded head and records it."""
    ls.LocalServices(ray_address="127.0.0.1:9", dashboard_url="http://127.0.0.1:9", mlflow_url="", mlflow_pgid=None,
                     ray_pgid=None).write(tmp_path)
    fake_ray("import time; time.sleep(120)")
    monkeypatch.setattr(ls, "_joined_node_id", lambda url, name: "ef" * 28)
    try:
        assert ls.spare_main(["--state-dir", str(tmp_path), "--slots", "3", "--timeout-s", "30"]) == 0
        (node,) = ls.LocalServices.read(tmp_path).spare_nodes
        assert node.resources[ls.SPARE_RESOURCE] == 3 and node.node_id in capsys.readouterr().out
    finally:
        assert any("spare node" in line for line in ls.stop_services(tmp_path))


def test_every_node_gets_a_ray_temp_dir_of_its_own(tmp_path):
    """Detects nodes sharing one temp dir (they would share the folder each unpacks a job's code into, and the head
    re-extracting it deletes a running spare-node driver's working dir) and paths too long for Ray's sockets."""
    head, spare = ls.ray_temp_dir(tmp_path), ls.ray_temp_dir(tmp_path, "draftsmith-spare-1")
    assert head != spare and head == ls.ray_temp_dir(tmp_path) and len(spare) < 40


def test_a_fresh_machine_gets_a_ray_auth_token_without_printing_it(tmp_path, monkeypatch):
    """`ray start` refuses to start in token mode without a token; the token is created once, never echoed."""
    calls = []
    monkeypatch.setattr(ls.Path, "home", lambda: tmp_path)

    def run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        (tmp_path / ".ray").mkdir(exist_ok=True)
        (tmp_path / ".ray" / "auth_token").write_text("secret")
        return ls.subprocess.CompletedProcess(cmd, 0, stderr=b"")

    monkeypatch.setattr(ls.subprocess, "run", run)
    ls._ensure_auth_token({"RAY_AUTH_MODE": "token"})
    ls._ensure_auth_token({"RAY_AUTH_MODE": "token"})  # the token exists now: nothing to do
    assert len(calls) == 1 and calls[0][0][-2:] == ["get-auth-token", "--generate"]
    assert calls[0][1]["stdout"] is ls.subprocess.DEVNULL
    ls._ensure_auth_token({"RAY_AUTH_MODE": "disabled"})
    assert len(calls) == 1
