"""The engine's settings: the one definition of every knob of a speculative-decoding pair.

What it does: declares, validates and documents the settings `SpecEngine` and the runners it drives
read (speculation length, batch shape, prompt lookup, the batch size that switches speculation off,
weight prepacking, the layer-parallel plan). Serve (`engine:` in `infra/serve.yaml`), evaluation, the
backfill and the benchmarks nest this model instead of copying its fields; `docs/configuration.md` is
rendered from the descriptions below.

`add_config_arguments` / `config_options` turn fields into command-line flags and back (the benchmarks'
flags are generated from the fields, never restated).

What it does not do: build runners or engines (specdec.py, layer_parallel.py), or hold settings of the
layers around the engine (request limits live in serve/config.py).
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class EngineConfig(BaseModel):
    """Settings of one target/draft pair and its engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_speculative_tokens: Annotated[int, Field(ge=0, le=32)] | Literal["auto"] = Field(
        "auto", description="Tokens drafted per step (gamma) when a request does not ask for another "
        "number; 0 = autoregressive decoding; auto = the speculation policy (policy.py) chooses, every step and "
        "per row, how many tokens to draft (0 included) and with which proposer, from a cost profile measured at "
        "start and live acceptance estimates.")
    auto_max_speculative_tokens: int = Field(8, ge=1, le=32, description="With num_speculative_tokens auto: the "
                                             "most tokens the policy may draft for a row in one step (the "
                                             "context headroom every request reserves).")
    auto_probe_interval: int = Field(64, ge=1, description="With num_speculative_tokens auto: a proposer the "
                                     "policy has not used for this many steps drafts one token for one step, so "
                                     "that a drafter that became worth it (a swap, a traffic shift) is noticed.")
    max_batch_size: int = Field(8, ge=1, description="Sequences decoded together (batch slots).")
    max_model_len: int = Field(2048, ge=16, description="Context length: prompt + output + speculation headroom.")
    topk_logprobs: int = Field(8, ge=0, le=64, description="Target top-k log-probabilities kept per output "
                               "position, for the traffic log; 0 = none.")
    seed: int = Field(0, description="Seeds the per-request generators of sampled requests that send no seed.")
    prompt_lookup_max: int = Field(0, ge=0, le=16, description="Prompt lookup (vLLM's ngram method): a sequence "
                                   "whose last n tokens (prompt_lookup_min <= n <= this) occurred earlier in it "
                                   "verifies the tokens that followed them instead of the drafter's, at no drafting "
                                   "cost; also speculates while no drafter is loaded. 0 = off.")
    prompt_lookup_min: int = Field(2, ge=1, le=16, description="Shortest n-gram prompt lookup matches.")
    disable_speculation_at_batch: int = Field(0, ge=0, description="With a fixed integer "
                                              "num_speculative_tokens: a decoding step with at least this many "
                                              "running sequences decodes them autoregressively (vLLM's "
                                              "speculative_disable_by_batch_size): verifying gamma + 1 tokens of "
                                              "every row is compute-bound at large batches. 0 = never. Ignored "
                                              "with auto, whose policy decides every step itself.")
    prepack_weights: bool = Field(True, description="On CPU, run target and drafter on oneDNN-prepacked copies of "
                                  "their weights (the layout oneDNN's matrix products read directly), at the "
                                  "memory of a second copy of the weights.")
    layer_parallel_group_size: int = Field(1, ge=1, description="Layer-parallel drafting (EasySpec): drafter "
                                           "layers per group, run at once on the same input; 1 = sequential.")
    layer_parallel_group_sizes: tuple[PositiveInt, ...] = Field((), description="Explicit consecutive group "
                                                                "sizes summing to the drafter's layer count "
                                                                "(overrides the group size), e.g. [1, 2, 2, 2, 1]: "
                                                                "first and last layer sequential.")
    layer_parallel_devices: tuple[str, ...] = Field((), description="Devices of the pair: a group's drafter "
                                                    "layers run on them concurrently (round robin) and the target "
                                                    "is split over them in contiguous stages; empty = one device, "
                                                    "stacked groups.")

    @property
    def auto(self) -> bool:
        """True when the speculation policy chooses the draft lengths."""
        return self.num_speculative_tokens == "auto"

    @property
    def max_speculative_tokens(self) -> int:
        """The most tokens a row drafts per step when its request asks for no length of its own."""
        return self.auto_max_speculative_tokens if self.auto else self.num_speculative_tokens

    @model_validator(mode="after")
    def _lookup_range(self):
        if self.prompt_lookup_max and self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        return self


# ----- command lines -----------------------------------------------------------------------------------
def _parse_tuple(item_type):
    def parse(text: str) -> tuple:
        try:
            return tuple(item_type(part) for part in text.replace(" ", "").split(",") if part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated {item_type.__name__} values") from None
    return parse


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer or auto") from None


def add_config_arguments(parser: argparse.ArgumentParser, fields: Sequence[str] | Mapping[str, str]) -> None:
    """Add one flag per EngineConfig field (`--field-name`, or the flag a mapping gives), with the field's type
    and description; unset flags stay None, so `config_options` passes only what the command line set and
    the model keeps the one definition of every default and rule."""
    flags = fields if isinstance(fields, Mapping) else {name: "--" + name.replace("_", "-") for name in fields}
    for name, flag in flags.items():
        info = EngineConfig.model_fields[name]
        kind = info.annotation
        kwargs = {"type": int, "metavar": "N"}
        if kind is bool:
            kwargs = {"action": argparse.BooleanOptionalAction}
        elif getattr(kind, "__origin__", None) is tuple:
            item = typing.get_args(kind)[0]
            kwargs = {"type": _parse_tuple(str if item is str else int), "metavar": "A,B,..."}
        elif typing.get_origin(kind) is typing.Union:
            kwargs = {"type": _int_or_auto, "metavar": "N|auto"}  # int | Literal["auto"], the one union here
        elif kind is not int:
            kwargs = {"type": kind}
        default = info.default
        parser.add_argument(flag, dest=name, default=None,
                            help=f"{info.description} (engine setting {name}; default {default!r})", **kwargs)


def config_options(args: argparse.Namespace, fields: Iterable[str]) -> dict:
    """The EngineConfig fields among `fields` that the command line set, validated by the model (ValueError)."""
    options = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    EngineConfig(**options)
    return options
