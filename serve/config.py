"""Configuration of the Serve application: one pydantic model, loadable from YAML or Serve's `args:`.

What it does: declares every knob of the serving application (target, drafter source, engine shape,
traffic log, drafter polling, placement, autoscaling, auth) with a description, validates it, and
turns the placement/autoscaling parts into the keyword arguments of `Deployment.options(...)`.

What it does not do: build models or deployments (spec_pair.py, app.py do).

`serve run serve.app:build_app target=tiny drafter=derived:first1` passes flat string arguments;
`args: {config: infra/serve.yaml}` (or `config=...` on the command line) loads a YAML file whose
top level is either this model or a Serve config (`applications: [{args: ...}]`); other arguments
override the file's values.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from draftsmith.engine_config import EngineConfig


# Every serving actor (SpecPair replicas, the Ingress, the TrafficLogger) asks for a node WITHOUT the spare-node label
# (`draftsmith.io/pool=spare`, set by `ray start --labels` on the nodes that lend spare compute to distillation:
# pipelines/local_services.py, infra/kuberay/, infra/ray-cluster.yaml). "!spare" also matches a node with no such
# label at all (the head). Why: spare nodes advertise no CPU, which keeps replicas off them, but the Ingress and the
# logger ask for no CPU either, so Serve's SPREAD placement could put them (and then a proxy) on a spare node, whose
# cores belong to training and which may be preempted.
SERVING_LABEL_SELECTOR: dict[str, str] = {"draftsmith.io/pool": "!spare"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineSettings(EngineConfig):
    """The `engine:` section: the engine's own settings (draftsmith.engine_config, the one definition of
    each) plus the limits Serve puts on what a request may ask for."""

    max_num_speculative_tokens: int = Field(16, ge=0, description="Largest num_speculative_tokens a request may "
                                            "ask for (`draftsmith.num_speculative_tokens`); larger values are "
                                            "refused.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens for chat requests that do not set it.")


class TrafficSettings(_Section):
    enabled: bool = Field(True, description="Log completed requests as TrafficRecords.")
    uri: str = Field(".state/traffic", description="Traffic log root: a local path or any pyarrow/fsspec URI.")
    flush_every_records: int = Field(256, ge=1, description="The writer flushes a file every N records...")
    flush_every_seconds: float = Field(30.0, gt=0, description="...or every T seconds, whichever comes first.")
    log_text: bool = Field(True, description="Keep prompt/output text; false applies traffic.drop_text.")
    log_features: bool = Field(
        False, description="Also log the target's final-normed hidden state (float16) at every position of each "
        "logged request's prompt + output but the last, in a side file beside its Parquet part "
        "(draftsmith.traffic_features), so distillation of a feature drafter reads them instead of recomputing "
        "them. Storage: 2 x the target's hidden size bytes per token. Opt-out and retention apply to them as to "
        "the record; decoding is unchanged.")
    send_batch_size: int = Field(32, ge=1, description="Most records a replica sends the logger in one call.")
    send_interval_seconds: float = Field(0.5, gt=0, description="Max delay before a replica sends its batch; also "
                                         "how often it asks the logger which records are on storage.")
    confirm_before_response: bool = Field(
        True, description="A response waits until the logger has received its record (one actor call, shared by "
        "the requests finishing together), so a replica killed after answering has lost no record. false: "
        "fire-and-forget; a killed replica loses up to send_interval_seconds of records.")
    handoff_timeout_s: float = Field(5.0, gt=0, description="Longest a response waits for that hand-off (logger "
                                     "restarting); after it the response goes out and the record stays queued.")
    send_retries: int = Field(20, ge=0, description="Failed sends of one batch (logger down) before its records "
                              "are given up and counted in draftsmith_traffic_records_undelivered.")
    logger_call_timeout_s: float = Field(15.0, gt=0, description="Longest a replica waits for one call to the "
                                         "logger before it counts as failed and is retried.")
    max_unconfirmed_records: int = Field(
        4096, ge=1, description="Records a replica keeps until the logger reports them on storage (resent if the "
        "logger dies first); beyond it the oldest are released unconfirmed and counted.")


class PlacementSettings(_Section):
    num_cpus: float = Field(1.0, ge=0, description="CPUs of the replica actor (must fit in the first bundle).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the replica actor (must fit in the first bundle).")
    bundles: list[dict[str, float]] | None = Field(
        None, description="Placement-group bundles per replica, e.g. [{CPU: 1, GPU: 1}, {GPU: 1}]: a pair owning "
                          "several devices. None: no placement group.")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy for `bundles`.")
    device: str = Field("auto", description="Torch device for the pair: auto (cuda when a GPU is assigned), cpu, cuda.")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in the replica (None: leave).")

    @model_validator(mode="after")
    def _actor_fits_first_bundle(self):
        if self.bundles:
            first = self.bundles[0]
            if self.num_cpus > first.get("CPU", 0) or self.num_gpus > first.get("GPU", 0):
                raise ValueError(f"the replica actor (num_cpus={self.num_cpus}, num_gpus={self.num_gpus}) must fit "
                                 f"in the first placement bundle {first}")
        return self


class AutoscalingSettings(_Section):
    enabled: bool = Field(False, description="Use Serve autoscaling; false: a fixed `num_replicas`.")
    num_replicas: int = Field(1, ge=1, description="Replicas when autoscaling is off.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(2, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests per replica that autoscaling aims at.")
    upscale_delay_s: float = Field(10.0, ge=0, description="How long demand must be high before scaling up.")
    downscale_delay_s: float = Field(120.0, ge=0, description="How long demand must be low before scaling down.")


class ServeAppConfig(BaseModel):
    """Everything one Draftsmith serving application needs."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("draftsmith", description="The model name clients send (`model`) and /v1/models lists.")
    target: str = Field("tiny", description="Target spec: tiny, smollm2-135m-instruct, an HF dir or a .gguf file.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    drafter: str | None = Field(
        "derived:first1", description="Drafter source: a local drafter dir (re-read when its contents change), "
        "`derived:<layers>` (derived from the target at start; `feature:<layers>` for an EAGLE-style drafter that "
        "reads the target's features), `models:/<name>@<alias>` (MLflow), or null.")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking URI for a models:/ drafter source.")
    mlflow_registry_uri: str | None = Field(None, description="MLflow registry URI (default: the tracking URI).")
    drafter_poll_interval_s: float = Field(30.0, gt=0, description="Seconds between checks for a new drafter.")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    traffic: TrafficSettings = Field(default_factory=TrafficSettings)
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    max_ongoing_requests: int = Field(64, ge=1, description="Requests Serve sends one SpecPair replica at once "
                                      "(beyond max_batch_size they queue inside the engine).")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress deployment.")
    max_request_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted; larger "
                                        "bodies get 413 before they are parsed.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longest prompt in tokens (after the chat "
                                          "template); longer prompts get 400. None: only the context length limits.")
    health_check_period_s: float = Field(10.0, gt=0, description="Serve's health-check period of SpecPair replicas: "
                                         "how soon a dead replica is noticed and replaced.")
    mlflow_http_max_retries: int | None = Field(
        3, ge=0, description="MLFLOW_HTTP_REQUEST_MAX_RETRIES in the replicas: bounds how long a drafter poll waits "
        "on a dead MLflow server (MLflow's default, 7 retries with exponential backoff, waits minutes). None: "
        "MLflow's default.")
    mlflow_http_timeout_s: float | None = Field(10.0, gt=0, description="MLFLOW_HTTP_REQUEST_TIMEOUT in the "
                                                "replicas. None: MLflow's default (120 s).")
    auth_token: str | None = Field(None, description="If set, require `Authorization: Bearer <token>`.")
    auth_token_env: str | None = Field(None, description="Name of an environment variable holding the bearer "
                                       "token (a Kubernetes Secret); keeps the token out of config files.")

    def bearer_token(self) -> str | None:
        """The token requests must present, from `auth_token` or the `auth_token_env` variable."""
        if self.auth_token_env:
            token = os.environ.get(self.auth_token_env)
            if not token:
                raise ValueError(f"auth_token_env names {self.auth_token_env!r}, which is not set in the environment")
            return token
        return self.auth_token

    @field_validator("drafter")
    @classmethod
    def _drafter_source(cls, value: str | None) -> str | None:
        if value in (None, "", "none", "null"):
            return None
        if value in ("derived:", "feature:"):
            raise ValueError(f"`{value}` needs a layer spec, e.g. derived:first2+last1, derived:0,29 or feature:last1")
        return value

    @model_validator(mode="after")
    def _pair_gpus_are_the_replicas(self):
        # Ray shows an actor only the GPUs it was given (CUDA_VISIBLE_DEVICES): cuda:1 exists in the
        # replica only if the replica actor itself holds two GPUs, not if a second bundle reserves one.
        gpus = {d if ":" in d else f"{d}:0" for d in self.engine.layer_parallel_devices if d.startswith("cuda")}
        if len(gpus) > self.placement.num_gpus:
            raise ValueError(f"engine.layer_parallel_devices names {len(gpus)} GPUs but the replica actor has "
                             f"placement.num_gpus={self.placement.num_gpus:g}: give the actor all of the pair's "
                             f"GPUs (e.g. num_gpus: {len(gpus)}, bundles: [{{CPU: 1, GPU: {len(gpus)}}}])")
        return self

    @model_validator(mode="after")
    def _registry_needs_uri(self):
        if self.drafter and self.drafter.startswith("models:/") and not self.mlflow_tracking_uri:
            raise ValueError(f"drafter {self.drafter!r} is an MLflow URI: set mlflow_tracking_uri too")
        return self

    def mlflow_env(self) -> dict[str, str]:
        """The MLflow client's retry bounds as environment variables (MLflow reads them per request)."""
        env = {}
        if self.mlflow_http_max_retries is not None:
            env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.mlflow_http_max_retries)
            env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        if self.mlflow_http_timeout_s is not None:
            env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, self.mlflow_http_timeout_s)))
        return env

    # ----- Serve options --------------------------------------------------------------------------
    def spec_pair_options(self) -> dict[str, Any]:
        """Keyword arguments for `SpecPair.options(...)`: resources, placement group, replicas, and the label
        selector that keeps the replica off spare nodes (SERVING_LABEL_SELECTOR)."""
        p, a = self.placement, self.autoscaling
        actor: dict[str, Any] = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus}
        if not p.bundles:
            actor["label_selector"] = dict(SERVING_LABEL_SELECTOR)
        env = self.mlflow_env()
        if env and self.drafter and self.drafter.startswith("models:/"):
            actor["runtime_env"] = {"env_vars": env}
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            "health_check_period_s": self.health_check_period_s,
            "max_ongoing_requests": self.max_ongoing_requests,
            "user_config": {"drafter": self.drafter, "drafter_poll_interval_s": self.drafter_poll_interval_s},
            # Loading a target can take a while (first SmolLM2 use converts its GGUF).
            "health_check_timeout_s": 120,
        }
        if p.bundles:
            options["placement_group_bundles"] = p.bundles
            options["placement_group_strategy"] = p.strategy
            # In a placement group the bundles choose the node (the actor goes into bundle 0), so the selector goes
            # on every bundle: a bundle without CPU ({GPU: 1}) would otherwise fit a spare GPU node.
            options["placement_group_bundle_label_selector"] = [dict(SERVING_LABEL_SELECTOR) for _ in p.bundles]
        if a.enabled:
            options["autoscaling_config"] = {
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "initial_replicas": max(a.min_replicas, 1),
                "target_ongoing_requests": a.target_ongoing_requests,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
            }
        else:
            options["num_replicas"] = a.num_replicas
        return options


def speculation_arg(text: str) -> int | str:
    """A command line's speculation length, `auto` or a number of tokens, checked by EngineConfig's own rule
    (argparse `type=`)."""
    try:
        return EngineConfig(num_speculative_tokens=text.strip()).num_speculative_tokens
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be `auto` or a number of tokens that "
                                         "EngineConfig.num_speculative_tokens allows") from None


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """`engine.max_batch_size=4` style keys (from `serve run ... key=value`) -> nested dicts."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml_args(path: str | Path) -> dict[str, Any]:
    """The app args in a YAML file: either ServeAppConfig fields or a Serve config's first app `args`."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if "applications" in data:
        apps = data["applications"]
        if not apps:
            raise ValueError(f"{path}: `applications` is empty")
        data = apps[0].get("args", {}) or {}
    return data


def parse_app_args(args: dict[str, Any] | ServeAppConfig | None) -> ServeAppConfig:
    """Serve `args` (possibly flat strings from the command line, possibly `config: file.yaml`) -> config."""
    if isinstance(args, ServeAppConfig):
        return args
    args = dict(args or {})
    base: dict[str, Any] = {}
    if "config" in args:
        base = load_yaml_args(args.pop("config"))
    merged = _merge(base, _nest(args))
    return ServeAppConfig.model_validate(_coerce_strings(merged, ServeAppConfig))


def _admits_str(annotation: Any) -> bool:
    """Whether a field of this type takes a string as it is (str, str | None, a Literal of strings)."""
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(isinstance(choice, str) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(_admits_str(arg) for arg in typing.get_args(annotation))
    return False


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model of a nested section (`engine: EngineSettings`, or `EngineSettings | None`)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is None and isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _coerce_strings(node: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`serve run` passes every value as a string: YAML-parse the strings given to fields that are not
    strings (`engine.max_batch_size=4` -> 4, `autoscaling.enabled=true` -> True), by the model's field
    types, so that `auth_token=123456` or `model_name=1.0` stay the strings they are."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        field = model.model_fields.get(key)
        if field is None:  # an unknown key: validation names it
            out[key] = value
        elif isinstance(value, dict) and (section := _section_model(field.annotation)) is not None:
            out[key] = _coerce_strings(value, section)
        elif isinstance(value, str) and not _admits_str(field.annotation):
            try:
                out[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                out[key] = value  # validation says what is wrong with it
        else:
            out[key] = value
    return out
