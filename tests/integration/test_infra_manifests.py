"""Every file under infra/ checked against the code: import paths, config keys, resource figures, metric names.

Fast: nothing starts (no Ray, no MLflow server); modules are imported and config classes validated.
Nothing here skips: a config class, function or manifest that a check names and that is missing or
renamed fails the check, so that a rename can never turn a check off silently. A new file under infra/
must be claimed by a check below (test_every_file_is_checked).

Spare compute (issue 20): every cluster config (the local spare node of pipelines/local_services.py, the
RayService's `spare` group, the RayJob, the cluster launcher's `spare` type) advertises `draftsmith_spare` and
no CPU on spare nodes only; a SpecPair bundle fits no spare node, and the trigger's job driver plus a
distillation worker (infra/trigger.yaml, infra/distill.yaml) fit a spare node and no serving one.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
RAYSERVICE = INFRA / "kuberay" / "rayservice.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob-distill.yaml"
CLUSTER = INFRA / "ray-cluster.yaml"
MLFLOW_K8S = INFRA / "mlflow" / "mlflow.yaml"
MLFLOW_ENV = INFRA / "mlflow" / "mlflow.env"
DASHBOARD = INFRA / "grafana" / "draftsmith-dashboard.json"
SERVE_YAML = INFRA / "serve.yaml"

# Plain config files: infra/<name> -> the pydantic class that loads it.
CONFIG_CLASSES = {
    "distill.yaml": ("jobs.distill", "DistillJobConfig"),
    "evaluate.yaml": ("jobs.evaluate", "EvaluateConfig"),
    "trigger.yaml": ("pipelines.trigger", "TriggerConfig"),
}
SERVE_CONFIG = ("serve.config", "ServeAppConfig")
GPU = "nvidia.com/gpu"
SPARE = "draftsmith_spare"  # the custom resource of spare compute (pipelines.local_services.SPARE_RESOURCE)


# ------------------------------------------------------------------------------------------- helpers


def _files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file())


def _docs(path: Path) -> list:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _doc(path: Path, kind: str | None = None) -> dict:
    docs = [d for d in _docs(path) if kind is None or d.get("kind") == kind]
    assert len(docs) == 1, f"{path.relative_to(REPO)}: expected one {kind or 'document'}, found {len(docs)}"
    return docs[0]


def _code_class(module: str, name: str):
    """The config class; a missing module or class fails (renamed? update the check with it)."""
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"{module}.{name} does not exist: renamed? update {Path(__file__).name}"
    return getattr(mod, name)


def _resolve_import_path(import_path: str):
    module, sep, attr = import_path.partition(":")
    if not sep:  # Serve also accepts "module.attr"
        module, _, attr = import_path.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _quantity(value) -> float:
    """A Kubernetes quantity ("500m", "4", 4, "32Gi") as a number (cpu/gpu units only matter here)."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def _custom_resources(group: dict, where: str) -> dict[str, float]:
    """The custom Ray resources of a KubeRay group, as Ray's own KubeRay autoscaler reads them and as the
    `ray start --resources=...` command that KubeRay generates (through a shell) passes them: the format of
    `rayStartParams.resources` is a JSON object in double quotes with its inner quotes escaped."""
    from ray.autoscaler._private.kuberay import autoscaling_config as kuberay

    params = group.get("rayStartParams", {}) or {}
    assert hasattr(kuberay, "_get_custom_resources"), \
        "ray's KubeRay autoscaler no longer has _get_custom_resources: renamed? update this check"
    try:
        read = kuberay._get_custom_resources(group.get("resources") or {}, params, where)
    except Exception as error:
        pytest.fail(f"{where}: Ray's KubeRay autoscaler cannot read rayStartParams.resources "
                    f"{params.get('resources')!r} (expected like '\"{{\\\"{SPARE}\\\": 4}}\"'): {error!r}")
    if "resources" in params:
        (arg,) = shlex.split(f"--resources={params['resources']}")
        started = json.loads(arg.partition("=")[2])
        assert started == read, f"{where}: `ray start` would get {started}, the autoscaler reads {read}"
    return {k: float(v) for k, v in read.items()}


def _group_resources(group: dict, where: str) -> dict[str, float]:
    """One node of a KubeRay head/worker group: the Ray resources it advertises (custom ones included),
    checked against its pod."""
    params = group.get("rayStartParams", {}) or {}
    containers = group["template"]["spec"]["containers"]
    ray_container = containers[0]
    limits = (ray_container.get("resources") or {}).get("limits", {}) or {}
    cpu = _quantity(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", 0))
    gpu = _quantity(params["num-gpus"]) if "num-gpus" in params else _quantity(limits.get(GPU, 0))
    if "cpu" in limits:
        assert cpu <= _quantity(limits["cpu"]), f"{where}: num-cpus {cpu} exceeds the pod's cpu limit {limits['cpu']}"
    assert gpu == _quantity(limits.get(GPU, 0)), \
        f"{where}: Ray advertises {gpu} GPUs but the pod's {GPU} limit is {limits.get(GPU, 0)}"
    return {"CPU": cpu, "GPU": gpu, **_custom_resources(group, where)}


def _worker_groups(cluster_spec: dict, where: str) -> list[tuple[dict, dict[str, float], int]]:
    """(group, per-node resources, max nodes) for each worker group."""
    out = []
    for group in cluster_spec.get("workerGroupSpecs", []):
        name = f"{where} worker group {group['groupName']}"
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", group.get("replicas", 0))
        assert lo <= n <= hi, f"{name}: needs minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}"
        out.append((group, _group_resources(group, name), hi))
    return out


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in need.items() if v)


def _add(*resources: dict[str, float]) -> dict[str, float]:
    total: dict[str, float] = {}
    for r in resources:
        for k, v in r.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def _rayservice_app() -> tuple[dict, dict]:
    service = _doc(RAYSERVICE, "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    apps = serve_config["applications"]
    assert len(apps) == 1, "the RayService serves one application (the one of infra/serve.yaml)"
    return service, apps[0]


def _validated_serve_args(args: dict, where: str):
    """ServeAppConfig of `args` (every key validated)."""
    cls = _code_class(*SERVE_CONFIG)
    try:
        return cls.model_validate(args)
    except Exception as error:  # pydantic.ValidationError: show which file
        pytest.fail(f"{where}: app args do not validate against {SERVE_CONFIG[0]}.{SERVE_CONFIG[1]}: {error}")


def _mlflow_service_url() -> str:
    service = _doc(MLFLOW_K8S, "Service")
    meta = service["metadata"]
    port = service["spec"]["ports"][0]["port"]
    return f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}"


def _env_from_secret(container: dict, name: str) -> bool:
    for env in container.get("env", []) or []:
        if env.get("name") == name:
            return "secretKeyRef" in (env.get("valueFrom") or {})
    return False


def _all_groups(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]


# --------------------------------------------------------------------------------- every file parses


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_manifest_parses(path):
    docs = _docs(path)
    assert docs, f"{path.relative_to(REPO)} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.relative_to(REPO)}: top level must be a mapping"


def _claimed(path: Path) -> bool:
    if path.name in CONFIG_CLASSES or path in (RAYSERVICE, RAYJOB, CLUSTER, MLFLOW_K8S, DASHBOARD):
        return True
    docs = _docs(path)
    return bool(docs) and all("applications" in d for d in docs)  # Serve configs: checked below


def test_every_file_is_checked():
    unclaimed = [str(p.relative_to(REPO)) for p in _files() if not _claimed(p)]
    assert not unclaimed, (f"{unclaimed}: no check in {Path(__file__).name} claims these; add the file's config "
                           "class to CONFIG_CLASSES or a test for it")


# ------------------------------------------------------------------------------- Serve applications


def _serve_apps() -> list[tuple[str, dict]]:
    apps = []
    for path in _files():
        for doc in _docs(path):
            for app in doc.get("applications", []) if "applications" in doc else []:
                apps.append((f"{path.relative_to(REPO)}:{app.get('name')}", app))
    if RAYSERVICE.exists():
        _, app = _rayservice_app()
        apps.append((f"{RAYSERVICE.relative_to(REPO)}:serveConfigV2:{app.get('name')}", app))
    return apps


@pytest.mark.parametrize("where,app", _serve_apps(), ids=[w for w, _ in _serve_apps()])
def test_serve_app_import_path_and_args(where, app):
    builder = _resolve_import_path(app["import_path"])
    assert callable(builder), f"{where}: {app['import_path']} is not callable"
    args = dict(app.get("args") or {})
    if "config" in args:  # `args: {config: file.yaml, ...}`: the file must exist and merge cleanly
        assert (REPO / args["config"]).is_file(), f"{where}: args.config {args['config']} does not exist"
        parse = importlib.import_module(SERVE_CONFIG[0]).parse_app_args
        parse(args)
        return
    cfg = _validated_serve_args(args, where)
    if cfg.placement.bundles:
        first = cfg.placement.bundles[0]
        assert cfg.placement.num_cpus <= first.get("CPU", 0) and cfg.placement.num_gpus <= first.get("GPU", 0)


# -------------------------------------------------------------------------------- KubeRay RayService


def test_rayservice_is_the_serve_yaml_app():
    service, app = _rayservice_app()
    assert service["apiVersion"] == "ray.io/v1"
    local = [a for d in _docs(SERVE_YAML) for a in d.get("applications", [])]
    assert local, "infra/serve.yaml has no application"
    for key in ("name", "import_path", "route_prefix"):
        assert app.get(key) == local[0].get(key), f"RayService app {key} {app.get(key)!r} != infra/serve.yaml's " \
                                                  f"{local[0].get(key)!r}"


def test_rayservice_production_settings():
    service, app = _rayservice_app()
    cfg = _validated_serve_args(dict(app["args"]), "RayService")
    assert cfg.traffic.enabled and cfg.traffic.uri.startswith("s3://"), "traffic log must be on object storage"
    assert cfg.mlflow_tracking_uri == _mlflow_service_url(), \
        f"the replicas watch {cfg.mlflow_tracking_uri}, but infra/mlflow/mlflow.yaml serves {_mlflow_service_url()}"
    assert cfg.drafter and cfg.drafter.startswith("models:/") and cfg.drafter.endswith("@champion")
    assert cfg.autoscaling.enabled and cfg.autoscaling.min_replicas >= 1
    assert cfg.placement.num_gpus > 0 and cfg.placement.device != "cpu"
    assert cfg.dtype in ("bfloat16", "float16")


def test_rayservice_auth_token_from_secret():
    service, app = _rayservice_app()
    args = app["args"]
    assert not args.get("auth_token"), "never put the bearer token in the manifest: use a Secret + env var"
    env_name = args.get("auth_token_env")
    assert env_name, "auth must be on: args.auth_token_env names the env var that holds the token"
    cluster = service["spec"]["rayClusterConfig"]
    for group in _all_groups(cluster):
        for container in group["template"]["spec"]["containers"]:
            assert _env_from_secret(container, env_name), \
                f"container {container['name']} does not set {env_name} from a Secret (secretKeyRef)"
    assert _validated_serve_args(dict(args), "RayService").auth_token_env == env_name


def test_rayservice_resources_agree():
    service, app = _rayservice_app()
    cfg = _validated_serve_args(dict(app["args"]), "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    head = _group_resources(cluster["headGroupSpec"], "RayService head")
    assert head["GPU"] == 0, "GPUs belong to the worker groups"
    # Serving capacity: the spare group is checked below (test_rayservice_spare_group_is_never_serving's).
    groups = [g for g in _worker_groups(cluster, "RayService") if SPARE not in g[1]]
    p, a = cfg.placement, cfg.autoscaling
    bundles = p.bundles or [{"CPU": p.num_cpus, "GPU": p.num_gpus}]
    assert any(b.get("GPU", 0) > 0 for b in bundles), "production SpecPair bundles must hold GPUs"
    per_replica = _add(*bundles)
    nodes = [node for _, node, _ in groups]
    for bundle in bundles:
        assert any(_fits(bundle, node) for node in nodes), f"bundle {bundle} fits no worker node {nodes}"
    if p.strategy == "STRICT_PACK":
        assert any(_fits(per_replica, node) for node in nodes), \
            f"STRICT_PACK: a replica's bundles {per_replica} must fit one node; nodes: {nodes}"
    max_replicas = a.max_replicas if a.enabled else a.num_replicas
    capacity = _add(*({k: v * hi for k, v in node.items()} for _, node, hi in groups))
    for key in ("GPU", "CPU"):
        need = max_replicas * per_replica.get(key, 0.0)
        assert need <= capacity[key], \
            f"{max_replicas} replicas x {per_replica.get(key, 0)} {key} = {need} > the worker groups' max {capacity[key]}"
    if a.enabled and any(lo < hi for g, _, hi in groups for lo in [g.get("minReplicas", 0)]):
        assert cluster.get("enableInTreeAutoscaling") is True, \
            "Serve autoscaling beyond the running pods needs enableInTreeAutoscaling: true"


# ----------------------------------------------------------------------- spare compute (issue 20 item 1)


def _serving_bundles() -> tuple[list[dict], dict[str, float]]:
    _, app = _rayservice_app()
    p = _validated_serve_args(dict(app["args"]), "RayService").placement
    bundles = p.bundles or [{"CPU": p.num_cpus, "GPU": p.num_gpus}]
    return bundles, _add(*bundles)


def _trigger_driver() -> dict[str, float]:
    """What the trigger's job driver asks for (infra/trigger.yaml: entrypoint_num_cpus/gpus/resources)."""
    cfg = _code_class("pipelines.trigger", "TriggerConfig").model_validate(
        yaml.safe_load((INFRA / "trigger.yaml").read_text()) or {})
    return {k: float(v) for k, v in {"CPU": cfg.entrypoint_num_cpus, "GPU": cfg.entrypoint_num_gpus,
                                      **cfg.entrypoint_resources}.items() if v}


def _distill_worker(cfg) -> dict[str, float]:
    """A Ray Train worker's resources as ScalingConfig sees them (jobs/distill.py passes resources_per_worker)."""
    from ray.train import ScalingConfig

    scaling = ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                            resources_per_worker=dict(cfg.resources_per_worker))
    return {k: float(v) for k, v in scaling._resources_per_worker_not_none.items()}


def _spare_split(nodes: dict[str, dict[str, float]], where: str) -> tuple[dict, dict]:
    """(spare nodes, serving nodes) by whether they advertise SPARE; a spare node advertises no CPU."""
    spare = {n: r for n, r in nodes.items() if r.get(SPARE, 0) > 0}
    assert spare, f"{where}: no node advertises the custom resource {SPARE} (the spare pool)"
    for name, resources in spare.items():
        assert resources.get("CPU", 0) == 0, (f"{where}: spare node {name} advertises CPU {resources['CPU']}: Serve "
                                              "spreads replicas over nodes with CPU, so serving could land there")
    return spare, {n: r for n, r in nodes.items() if n not in spare}


def _check_split(nodes: dict[str, dict[str, float]], where: str, job_worker: dict[str, float]) -> None:
    """Serving never fits a spare node; the trigger's driver and a distillation worker fit only spare ones."""
    spare, serving = _spare_split(nodes, where)
    bundles, per_replica = _serving_bundles()
    for name, node in spare.items():
        for need in (*bundles, per_replica):
            assert not _fits(need, node), f"{where}: a SpecPair bundle {need} fits the spare node {name} {node}"
    assert any(_fits(per_replica, node) for node in serving.values()), f"{where}: serving fits no serving node"
    driver = _trigger_driver()
    assert driver.get(SPARE, 0) > 0, f"infra/trigger.yaml: the job's driver {driver} does not ask for {SPARE}"
    assert job_worker.get(SPARE, 0) > 0, f"the distillation worker {job_worker} does not ask for {SPARE}"
    for need, what in ((driver, "the trigger's job driver"), (job_worker, "a distillation worker")):
        assert not any(_fits(need, node) for node in serving.values()), f"{where}: {what} {need} fits a serving node"
    assert any(_fits(_add(driver, job_worker), node) for node in spare.values()), \
        f"{where}: the driver {driver} and a worker {job_worker} fit no spare node {spare} together"


def _cluster_nodes(cluster_spec: dict, where: str) -> dict[str, dict[str, float]]:
    nodes = {"head": _group_resources(cluster_spec["headGroupSpec"], f"{where} head")}
    nodes.update({g["groupName"]: node for g, node, _ in _worker_groups(cluster_spec, where)})
    return nodes


def test_distill_yaml_workers_ask_for_spare_compute():
    cfg = _code_class(*CONFIG_CLASSES["distill.yaml"]).model_validate(
        yaml.safe_load((INFRA / "distill.yaml").read_text()))
    worker = _distill_worker(cfg)
    assert worker.get(SPARE, 0) > 0, f"infra/distill.yaml: resources_per_worker {worker} does not name {SPARE}"
    assert worker.get("CPU", 0) == 0, f"infra/distill.yaml: a worker asking for CPU ({worker}) fits no spare node"


def test_local_spare_node_fits_the_job():
    """pipelines/local_services.py's spare node (what `draftsmith spare` / start_services(spare_slots) start)
    against infra/trigger.yaml's driver and infra/distill.yaml's workers; its head has no SPARE."""
    import inspect

    from pipelines import local_services

    assert local_services.SPARE_RESOURCE == SPARE
    slots = inspect.signature(local_services.add_spare_node).parameters["slots"].default
    cmd = local_services.spare_node_command("127.0.0.1:1", node_name="n", slots=slots)
    args = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    spare = {"CPU": float(args["--num-cpus"]), "GPU": float(args.get("--num-gpus", 0)),
             **{k: float(v) for k, v in json.loads(args["--resources"]).items()}}
    local_head = {"CPU": 4.0, "GPU": 0.0}  # `ray start --head --num-cpus N`, no --resources
    assert "--resources" not in inspect.getsource(local_services.start_ray_head), "the head must not carry SPARE"
    cfg = _code_class(*CONFIG_CLASSES["distill.yaml"]).model_validate(
        yaml.safe_load((INFRA / "distill.yaml").read_text()))
    worker = _distill_worker(cfg)
    need = _add(_trigger_driver(), *([worker] * cfg.num_workers))
    assert _fits(need, spare), f"the local spare node {spare} cannot hold the driver and {cfg.num_workers} workers {need}"
    assert not _fits(_trigger_driver(), local_head) and not _fits(worker, local_head)


def test_rayservice_spare_group_is_never_serving(monkeypatch):
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_labels_from_group_spec

    from pipelines.local_services import SPARE_LABEL

    service, _ = _rayservice_app()
    cluster = service["spec"]["rayClusterConfig"]
    nodes = _cluster_nodes(cluster, "RayService")
    assert nodes["head"].get(SPARE, 0) == 0, "the RayService head must not carry the spare resource"
    _, job_cfg = _distill_config_of_rayjob(monkeypatch)  # the production worker (GPU) of the same job
    _check_split(nodes, "infra/kuberay/rayservice.yaml", _distill_worker(job_cfg))
    for group in cluster["workerGroupSpecs"]:
        labels = _get_labels_from_group_spec(group, group["groupName"])
        if SPARE in _group_resources(group, group["groupName"]):
            assert labels.get(SPARE_LABEL[0]) == SPARE_LABEL[1], \
                f"spare group {group['groupName']}: label {SPARE_LABEL[0]}={SPARE_LABEL[1]} (as the local spare node)"
            assert group.get("minReplicas", 0) == 0, "spare pods exist only while a job asks for them"
            mounts = [m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
            assert any(job_cfg.state_dir.startswith(m.rstrip("/") + "/") for m in mounts), \
                f"spare group {group['groupName']}: state_dir {job_cfg.state_dir} is on no mounted volume"
    assert cluster.get("enableInTreeAutoscaling") is True, "spare pods (minReplicas 0) come from the autoscaler"


# ------------------------------------------------------------------------------------ KubeRay RayJob


def _entrypoint_commands(entrypoint: str) -> list[list[str]]:
    commands, current = [], []
    for token in shlex.split(entrypoint):
        if token in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def _module_of(command: list[str]) -> str | None:
    if len(command) >= 3 and Path(command[0]).name.startswith("python") and command[1] == "-m":
        return command[2]
    return None


def test_rayjob_entrypoint_modules_exist():
    job = _doc(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    commands = _entrypoint_commands(job["spec"]["entrypoint"])
    modules = [_module_of(c) for c in commands]
    assert modules and all(modules), f"every entrypoint command must be `python -m <module> ...`: {commands}"
    assert modules[0] == "jobs.distill"
    for command, module in zip(commands, modules):
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "main", None)), f"{module} has no main()"
        if "--config" in command:
            path = command[command.index("--config") + 1]
            assert (REPO / path).is_file(), f"{module} --config {path}: no such file in the repository"


def _distill_config_of_rayjob(monkeypatch):
    """The DistillJobConfig that the RayJob's entrypoint builds, through jobs.distill's own CLI parsing."""
    cls = _code_class("jobs.distill", "DistillJobConfig")
    distill = importlib.import_module("jobs.distill")
    for name in ("run_distill", "main", "DistillOutcome"):
        assert hasattr(distill, name), f"jobs.distill.{name} does not exist: renamed? update this check"
    job = _doc(RAYJOB, "RayJob")
    command = _entrypoint_commands(job["spec"]["entrypoint"])[0]
    captured = []

    def fake_run(cfg, *args, **kwargs):
        captured.append(cfg)
        return distill.DistillOutcome(None, None, {}, status="checked")

    monkeypatch.setattr(distill, "run_distill", fake_run)
    monkeypatch.chdir(REPO)  # --config paths are relative to the working_dir, the repository root
    assert distill.main(command[3:]) == 0
    assert len(captured) == 1 and isinstance(captured[0], cls)
    return job, captured[0]


def test_rayjob_distill_config_validates_and_matches_serving(monkeypatch):
    job, cfg = _distill_config_of_rayjob(monkeypatch)
    _, app = _rayservice_app()
    serving = _validated_serve_args(dict(app["args"]), "RayService")
    assert cfg.strategy == "deepspeed" and cfg.use_gpu
    assert cfg.target == serving.target, "the job must distill for the target that is served (traffic is per target)"
    assert cfg.traffic_uri == serving.traffic.uri, "the job must read the traffic log that serving writes"
    assert cfg.tracking_uri == serving.mlflow_tracking_uri == _mlflow_service_url()
    assert cfg.register_challenger
    assert serving.drafter.startswith(f"models:/{cfg.model_name}@"), \
        f"serving watches {serving.drafter}, the job registers into {cfg.model_name}"


def test_rayjob_resources_are_spare_capacity(monkeypatch):
    job, cfg = _distill_config_of_rayjob(monkeypatch)
    spec = job["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, "the job's cluster must go away when it finishes"
    cluster = spec["rayClusterSpec"]
    head = _group_resources(cluster["headGroupSpec"], "RayJob head")
    assert float(spec.get("entrypointNumCpus", 0)) <= head["CPU"], "the driver must fit on the head"
    assert float(spec.get("entrypointNumGpus", 0)) <= head["GPU"]
    if "submitterPodTemplate" in spec:
        assert spec["submitterPodTemplate"]["spec"]["containers"], "submitterPodTemplate needs a container"
    groups = _worker_groups(cluster, "RayJob")
    per_worker = dict(cfg.resources_per_worker)
    if cfg.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    assert per_worker.get("GPU", 0) > 0
    nodes = [node for _, node, _ in groups]
    assert any(_fits(per_worker, node) for node in nodes), f"a distill worker {per_worker} fits no node {nodes}"
    capacity = _add(*({k: v * hi for k, v in node.items()} for _, node, hi in groups))
    for key, need in per_worker.items():
        assert cfg.num_workers * need <= capacity.get(key, 0), \
            f"{cfg.num_workers} workers x {need} {key} > the job's worker groups' {capacity.get(key, 0)}"
    # spare capacity: the job's GPU quota is below serving's
    service, _ = _rayservice_app()
    serving_gpus = sum(node["GPU"] * hi for _, node, hi in _worker_groups(service["spec"]["rayClusterConfig"], "RS")
                       if SPARE not in node)
    assert capacity["GPU"] < serving_gpus, f"distillation may take {capacity['GPU']} GPUs, serving {serving_gpus}"
    # Ray Train storage and the staged dataset must be visible to the driver (head) and every worker
    for group in _all_groups(cluster):
        mounts = [m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert any(cfg.state_dir.startswith(m.rstrip("/") + "/") for m in mounts), \
            f"state_dir {cfg.state_dir} is not on a volume mounted in group {group.get('groupName', 'head')}"
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}") or {}
    assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "py_modules", "excludes", "config"}


# ------------------------------------------------------------------------------ Ray cluster launcher


def test_ray_cluster_launcher_config():
    cfg = _doc(CLUSTER)
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:  # the schema `ray up` validates against (integer resources, known keys)
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError as error:
        pytest.fail(f"infra/ray-cluster.yaml does not satisfy Ray's cluster config schema: {error.message}")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"infra/ray-cluster.yaml lacks {key}"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert "type" in cfg["provider"]
    for name, node in types.items():
        assert "resources" in node and "node_config" in node, f"node type {name} needs resources and node_config"
        assert node.get("min_workers", 0) <= node.get("max_workers", 0) or name == cfg["head_node_type"]
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= cfg["max_workers"]
    assert sum(t.get("max_workers", 0) for t in workers.values()) <= cfg["max_workers"], \
        "the global max_workers caps the node types' max_workers: raise it or lower theirs"
    setup = " ".join(cfg["setup_commands"])
    assert re.search(r"pip install .*(-e )?\.( |$)", setup), "setup_commands must install the project"
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address" in c for c in cfg["worker_start_ray_commands"])
    assert "." in (cfg.get("file_mounts") or {}).values(), "file_mounts must copy the repository"


def test_ray_cluster_launcher_fits_serving_and_distillation():
    cfg = _doc(CLUSTER)
    _, app = _rayservice_app()
    serving = _validated_serve_args(dict(app["args"]), "RayService")
    types = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    serve_types = {n: t for n, t in types.items() if SPARE not in t["resources"]}
    spare_types = {n: t for n, t in types.items() if SPARE in t["resources"]}
    assert spare_types, f"a node type with the custom resource `{SPARE}` models the spare pool"
    from pipelines.local_services import SPARE_LABEL

    for name, t in spare_types.items():
        assert (t.get("labels") or {}).get(SPARE_LABEL[0]) == SPARE_LABEL[1], \
            f"spare node type {name}: label {SPARE_LABEL[0]}={SPARE_LABEL[1]} (as the local spare node)"
    nodes = {n: {k: float(v) for k, v in t["resources"].items()} for n, t in cfg["available_node_types"].items()}
    assert SPARE not in nodes[cfg["head_node_type"]]
    # The smallest GPU distillation worker (the header's example asks for more of the node's cores).
    _check_split(nodes, "infra/ray-cluster.yaml", {"GPU": 1.0, SPARE: 1.0})
    p = serving.placement
    bundles = p.bundles or [{"CPU": p.num_cpus, "GPU": p.num_gpus}]
    per_replica = _add(*bundles)
    assert any(_fits(per_replica, t["resources"]) for t in serve_types.values())
    gpus = sum(t["resources"].get("GPU", 0) * t.get("max_workers", 0) for t in serve_types.values())
    assert serving.autoscaling.max_replicas * per_replica["GPU"] <= gpus
    spare = sum(t["resources"].get("GPU", 0) * t.get("max_workers", 0) for t in spare_types.values())
    assert 0 < spare < gpus


# ------------------------------------------------------------------------------------------ MLflow


def _server_options():
    from mlflow.cli import server

    flags, envvars = {}, {}
    for param in server.params:
        for opt in param.opts:
            flags[opt] = param
        if param.envvar:
            envvars[param.envvar] = param
    return flags, envvars


def test_mlflow_deployment_uses_postgres_and_object_store():
    deployment = _doc(MLFLOW_K8S, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[:2] == ["mlflow", "server"], f"the container must run `mlflow server`, runs {command[:2]}"
    flags, _ = _server_options()
    values = {}
    for i, token in enumerate(command[2:], start=2):
        if token.startswith("-"):
            assert token in flags, f"`mlflow server` has no option {token}"
            is_flag = flags[token].is_flag
            values[token] = True if is_flag else command[i + 1]
    assert values.get("--backend-store-uri", "").startswith("postgresql://")
    assert values.get("--artifacts-destination", "").startswith("s3://")
    assert values.get("--serve-artifacts") is True
    assert ":" not in urlparse(values["--backend-store-uri"].replace("$(", "").replace(")", "")).netloc.split("@")[0], \
        "no password in the command line (libpq reads PGPASSWORD)"
    port = int(values.get("--port", 5000))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in ports.values()
    service = _doc(MLFLOW_K8S, "Service")
    target = service["spec"]["ports"][0]["targetPort"]
    assert ports.get(target, target) == port, "the Service must route to the server's port"
    selector = service["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), "the Service selector must match the Deployment's pods"
    for env in container.get("env", []):
        if "PASSWORD" in env["name"]:
            assert "secretKeyRef" in env.get("valueFrom", {}), f"{env['name']} must come from a Secret"


def test_mlflow_env_file_keys_are_server_settings():
    import mlflow.environment_variables as mlflow_env

    _, envvars = _server_options()
    known = set(envvars) | {getattr(v, "name", None) for v in vars(mlflow_env).values()}
    settings = {}
    for line in MLFLOW_ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    for key in settings:
        if key.startswith("MLFLOW_"):
            assert key in known, f"{MLFLOW_ENV.name}: {key} is not an mlflow setting"
    assert settings["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert settings["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert settings["MLFLOW_SERVE_ARTIFACTS"].lower() == "true"
    assert not any("PASSWORD" in k for k in settings), "no passwords in the env file"


# ------------------------------------------------------------------------------------------ Grafana


def _const(node, names: dict):
    """Evaluate a tuple/str literal, a name bound to one, or `a + b` of those (tag_keys=tags + ("x",))."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _const(node.left, names), _const(node.right, names)
        return left + right if left is not None and right is not None else None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def exported_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """ray.util.metrics defined in serve/: name -> (Counter|Histogram|Gauge, tag_keys)."""
    found = {}
    for path in sorted((REPO / "serve").rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                value = _const(node.value, {})
                if isinstance(value, tuple):
                    names[node.targets[0].id] = value
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if kind not in ("Counter", "Histogram", "Gauge") or not node.args:
                continue
            name = _const(node.args[0], names)
            if not isinstance(name, str):
                continue
            tags = next((_const(k.value, names) for k in node.keywords if k.arg == "tag_keys"), ()) or ()
            found[name] = (kind, tuple(tags))
    return found


SUFFIXES = {"Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count"), "Gauge": ("",)}


def _dashboard_exprs() -> list[str]:
    dash = _doc(DASHBOARD)
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dash["panels"])
    exprs.extend(a["expr"] for a in dash.get("annotations", {}).get("list", []) if a.get("expr"))
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _ray_serve_metric_names() -> set[str]:
    import ray.serve

    text = "\n".join(p.read_text(errors="ignore") for p in Path(ray.serve.__file__).parent.rglob("_private/*.py"))
    return set(re.findall(r'"(serve_[a-z0-9_]+)"', text))


def test_grafana_metrics_exist_in_serving_code():
    metrics = exported_metrics()
    assert metrics, "serve/ defines no ray.util.metrics, but the Grafana dashboard reads them"
    serve_builtin = None
    used = set()
    for expr in _dashboard_exprs():
        for full in set(re.findall(r"\b(ray_[a-zA-Z0-9_]+)", expr)):
            base = full[len("ray_"):]
            if base.startswith("serve_"):
                serve_builtin = serve_builtin if serve_builtin is not None else _ray_serve_metric_names()
                assert base in serve_builtin, f"{full}: Ray Serve exports no metric {base}"
                continue
            match = [(name, kind) for name, (kind, _) in metrics.items()
                     for suffix in SUFFIXES[kind] if base == name + suffix]
            assert match, (f"dashboard metric {full} is not exported by serve/ (ray.util.metrics, exported as "
                           f"ray_<name>[_total|_bucket|_sum|_count]); serve/ exports {sorted(metrics)}")
            used.add(match[0][0])
            tags = set(metrics[match[0][0]][1])
            for labels in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                extra = {l.strip() for l in labels.split(",") if l.strip()} - tags - {"le"}
                assert not extra, f"{full} has no label {sorted(extra)} (tag_keys: {sorted(tags)})"
            for label in re.findall(r"[{,]\s*([a-zA-Z_]+)\s*=~?", expr):
                assert label in tags | {"le"}, f"{full} has no label {label} (tag_keys: {sorted(tags)})"
    kinds = {metrics[name][0] for name in used}
    assert {"Counter", "Histogram"} <= kinds, "the dashboard should show counters (tokens, acceptance) and latency"


def test_grafana_dashboard_structure():
    dash = _doc(DASHBOARD)
    assert dash.get("uid") and dash.get("title")
    panels = []

    def walk(items):
        for panel in items:
            panels.append(panel)
            walk(panel.get("panels", []))

    walk(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert "gridPos" in panel and panel.get("title"), f"panel {panel.get('id')} needs a title and gridPos"
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    for expr in _dashboard_exprs():
        for var in re.findall(r"\$(?!__)([a-zA-Z_]+)", expr):
            assert var in variables, f"query uses ${var}, which the dashboard does not define"


# ------------------------------------------------------------------------------- plain config files


@pytest.mark.parametrize("name", sorted(CONFIG_CLASSES))
def test_config_file_validates(name):
    path = INFRA / name
    assert path.exists(), f"infra/{name} does not exist (CONFIG_CLASSES names it)"
    cls = _code_class(*CONFIG_CLASSES[name])
    data = yaml.safe_load(path.read_text()) or {}
    try:
        cls.model_validate(data)
    except Exception as error:
        pytest.fail(f"infra/{name} does not validate against {'.'.join(CONFIG_CLASSES[name])}: {error}")


def test_trigger_submits_configs_that_exist():
    cls = _code_class("pipelines.trigger", "TriggerConfig")
    path = INFRA / "trigger.yaml"
    cfg = cls.model_validate(yaml.safe_load(path.read_text()) or {}) if path.exists() else cls()
    for field in ("distill_config", "evaluate_config"):
        ref = getattr(cfg, field, None)
        if ref:
            assert (REPO / ref).is_file(), (f"TriggerConfig.{field} ({'infra/trigger.yaml' if path.exists() else 'default'})"
                                             f" is {ref}, which does not exist: the submitted job would fail")
            name = Path(ref).name
            if name in CONFIG_CLASSES:
                _code_class(*CONFIG_CLASSES[name]).model_validate(yaml.safe_load((REPO / ref).read_text()) or {})
