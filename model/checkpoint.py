"""Checkpoint I/O with upstream key names (docs/upstream-compat.md#resume, #checkpoint-layout, #state-dict-keys, #checkpoint-loading).

- `save_weights` writes a safetensors file atomically (model.safetensors / ema.safetensors layout); the
  VAE is included only while it is trained (UniMedVL `vae_model.*`), otherwise it lives in ae.safetensors.
- `load_weights` accepts `module.` / `.module.` prefixes, drops the two sin-cos tables (rebuilt for the
  current sizes), converts a conv patch embedding to the linear form, and reports missing/unexpected/
  mismatched keys in one `CheckpointError` naming them (unless strict=False).
- `write_inference_files` / `load_model_from_dir` are the checkpoint-directory contract between the trainer
  and inference: llm_config.json, vit_config.json (untruncated layer count, truncation recorded),
  config.json, generation_config.json, training_args.json, tokenizer files; weights from ema.safetensors or
  model.safetensors (or the UniMedVL component files), the VAE from ae.safetensors / vae_model.safetensors.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from pipelines.storage.uris import write_text_atomic

from .config import ModelConfig
from .siglip import conv_to_linear_patch_weight

POS_EMBED_KEYS = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")
PATCH_WEIGHT_KEY = "vit_model.vision_model.embeddings.patch_embedding.weight"
VIT_LAYER_RE = re.compile(r"^vit_model\.vision_model\.encoder\.layers\.(\d+)\.")
COMPONENTS = ("language_model", "vit_model", "vae_model")
VAE_FILES = ("ae.safetensors", "vae_model.safetensors")   # a frozen VAE's file next to the weights
GEN_PREFIXES = ("vae2llm.", "llm2vae.", "time_embedder.", "latent_pos_embed.", "vae_model.")
UND_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")
MAX_KEYS_LISTED = 12


class CheckpointError(RuntimeError):
    """Missing, unexpected or mismatched checkpoint contents; the message names the file and the keys."""


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: file shape vs model shape"
    skipped: list[str] = field(default_factory=list)     # keys of components switched off (visual_gen/und)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:MAX_KEYS_LISTED])
                more = f" (+{len(keys) - MAX_KEYS_LISTED} more)" if len(keys) > MAX_KEYS_LISTED else ""
                parts.append(f"{len(keys)} {label} key(s): {shown}{more}")
        return "; ".join(parts)


# -- state dicts ------------------------------------------------------------------------------

def checkpoint_state_dict(model: torch.nn.Module, include_vae: bool | None = None) -> dict[str, torch.Tensor]:
    """The tensors a model.safetensors holds: everything except `vae_model.*` while the VAE is frozen."""
    if include_vae is None:
        vae = getattr(model, "vae_model", None)
        include_vae = vae is not None and any(p.requires_grad for p in vae.parameters())
    return _untied((k, v) for k, v in model.state_dict().items() if include_vae or not k.startswith("vae_model."))


def _untied(items) -> dict[str, torch.Tensor]:
    """Detached tensors; a second tensor on already-seen storage (tied weights) is cloned, since safetensors
    refuses shared storage."""
    out, seen = {}, set()
    for key, value in items:
        t = value.detach()
        ptr = (t.device, t.untyped_storage().data_ptr()) if not t.is_meta else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def normalize_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP `module.` prefixes, drop the sin-cos tables, convert a conv patch embedding (docs/upstream-compat.md#checkpoint-loading)."""
    out = {}
    for key, value in state.items():
        key = key.replace(".module.", ".")
        while key.startswith("module."):
            key = key[len("module."):]
        if key in POS_EMBED_KEYS:
            continue
        if key == PATCH_WEIGHT_KEY:
            value = conv_to_linear_patch_weight(value)
        out[key] = value
    return out


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"format": "pt",
                                                                                       **(metadata or {})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_weights(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: str | Path,
                 include_vae: bool | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write model/ema weights with upstream key names, atomically (write elsewhere, then rename)."""
    path = Path(path)
    if isinstance(model_or_state, torch.nn.Module):
        state = checkpoint_state_dict(model_or_state, include_vae)
    else:
        state = _untied(model_or_state.items())
    _atomic_save(state, path, metadata)
    return path


def save_component_files(model: torch.nn.Module, directory: str | Path, include_vae: bool | None = None) -> None:
    """UniMedVL component files (`language_model.safetensors`, ...) with the component prefix stripped, and
    the non-standard model.safetensors.index.json whose weight_map maps component names to files."""
    directory = Path(directory)
    state = checkpoint_state_dict(model, include_vae)
    weight_map = {}
    for comp in COMPONENTS:
        part = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")}
        if part:
            _atomic_save(part, directory / f"{comp}.safetensors")
            weight_map[comp] = f"{comp}.safetensors"
    _write_json(directory / "model.safetensors.index.json", {"metadata": {"format": "components"},
                                                             "weight_map": weight_map})


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_weights(model: torch.nn.Module, source: str | Path | Mapping[str, torch.Tensor], strict: bool = True,
                 ) -> LoadReport:
    """Load upstream-named weights into `model`.

    The expected keys are the model's state dict minus the two sin-cos tables; `vae_model.*` is expected
    only when the file holds some VAE keys (a frozen VAE comes from ae.safetensors). Keys of components
    switched off by visual_gen / visual_und are skipped (VQA-only loading, docs/upstream-compat.md#checkpoint-loading). With strict=True any
    missing, unexpected or mismatched key raises one CheckpointError naming them; with strict=False the
    matching tensors are loaded and the report says what was skipped.
    """
    where = str(source) if not isinstance(source, Mapping) else "state dict"
    state = normalize_state_dict(read_weights(source) if not isinstance(source, Mapping) else source)
    own = model.state_dict()
    tied = model.config.llm.tie_word_embeddings if hasattr(model, "config") else False
    has_vae = any(k.startswith("vae_model.") for k in state)
    expected = {k for k in own if k not in POS_EMBED_KEYS and (has_vae or not k.startswith("vae_model."))}
    if tied:
        expected.discard("language_model.lm_head.weight")
    report = LoadReport()
    report.missing = sorted(expected - state.keys())
    cfg = getattr(model, "config", None)
    off = tuple(() if cfg is None else ((() if cfg.visual_gen else GEN_PREFIXES)
                                        + (() if cfg.visual_und else UND_PREFIXES)))
    report.skipped = sorted(k for k in state if k not in own and off and k.startswith(off))
    report.unexpected = sorted(k for k in state if k not in own and not (off and k.startswith(off)))
    to_load = {}
    for key, value in state.items():
        if key not in own:
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            continue
        to_load[key] = value
    if strict and not report.ok:
        raise CheckpointError(f"{where}: cannot load into the model: {report.describe()}. "
                              f"Pass strict=False to load the matching keys only.")
    with torch.no_grad():
        for key, value in to_load.items():
            own[key].copy_(value.to(own[key].dtype))
    report.loaded = len(to_load)
    return report


def load_vae_weights(vae: torch.nn.Module, source: str | Path | Mapping[str, torch.Tensor],
                     strict: bool = True) -> LoadReport:
    """FLUX AE weights (`encoder.*`, `decoder.*`); `module.` and `vae_model.` prefixes are stripped."""
    where = str(source) if not isinstance(source, Mapping) else "state dict"
    raw = read_weights(source) if not isinstance(source, Mapping) else source
    state = {}
    for key, value in raw.items():
        key = key.replace(".module.", ".")
        for prefix in ("module.", "vae_model."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    own = vae.state_dict()
    report = LoadReport(missing=sorted(own.keys() - state.keys()), unexpected=sorted(state.keys() - own.keys()))
    report.mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                         for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if strict and not report.ok:
        raise CheckpointError(f"{where}: cannot load into the VAE: {report.describe()}. "
                              f"Pass strict=False to load the matching keys only.")
    with torch.no_grad():
        for key, value in state.items():
            if key in own and tuple(value.shape) == tuple(own[key].shape):
                own[key].copy_(value.to(own[key].dtype))
                report.loaded += 1
    return report


# -- checkpoint directories -------------------------------------------------------------------

def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_inference_files(directory: str | Path, config: ModelConfig, tokenizer=None,
                          training_args: dict | None = None) -> Path:
    """The non-weight files of a checkpoint directory (docs/upstream-compat.md#inference-files).

    vit_config.json stores the UNTRUNCATED layer count and records the truncation, so reloading never drops
    a second layer (docs/upstream-compat.md#vit-layer-count). config.json carries the unified-model switches and the VAE config
    under a `medloom_format` marker.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "llm_config.json", config.llm.to_json_dict())
    _write_json(directory / "vit_config.json", config.vit.to_json_dict())
    _write_json(directory / "config.json", config.bagel_json_dict())
    special = getattr(tokenizer, "special", None)
    gen = {"do_sample": True, "temperature": 1.0, "max_new_tokens": 512}
    if special is not None:
        gen.update(bos_token_id=special.bos, eos_token_id=special.eos)
    _write_json(directory / "generation_config.json", gen)
    if training_args is not None:
        _write_json(directory / "training_args.json", training_args)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def _find_weights(directory: Path, use_ema: bool) -> list[Path]:
    names = ["ema.safetensors", "model.safetensors"] if use_ema else ["model.safetensors", "ema.safetensors"]
    for name in names:
        if (directory / name).exists():
            return [directory / name]
    comps = [directory / f"{c}.safetensors" for c in COMPONENTS if (directory / f"{c}.safetensors").exists()]
    if comps:
        return comps
    raise CheckpointError(f"{directory}: no weights found: expected ema.safetensors or model.safetensors "
                          f"(or UniMedVL component files language_model.safetensors, ...)")


def _read_dir_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    if len(files) == 1 and files[0].stem not in COMPONENTS:
        return read_weights(files[0])
    state = {}
    for f in files:
        state.update({f"{f.stem}.{k}": v for k, v in read_weights(f).items()})
    return state


def load_model_from_dir(directory: str | Path, use_ema: bool = True, strict: bool = True,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        tokenizer=None, **overrides: Any):
    """Build a `UnifiedModel` from a checkpoint directory (upstream HF dir or one we wrote) and load it.

    Weights: ema.safetensors when use_ema (falling back to model.safetensors), else model.safetensors; the
    VAE from `vae_model.*` keys if present, else ae.safetensors / vae_model.safetensors. A vit_config.json
    that was written already truncated (UniMedVL intermediate checkpoints) is detected from the weights and
    corrected with a warning. The embeddings grow only if the tokenizer (given, or the directory's)
    really added special tokens. Returns the model in train mode (call `.eval()` for inference).
    """
    from .unified import UnifiedModel

    directory = Path(directory)
    config = ModelConfig.from_checkpoint_dir(directory, **overrides)
    state = normalize_state_dict(_read_dir_weights(_find_weights(directory, use_ema)))   # read once
    if config.visual_und:
        layers = {int(m.group(1)) for k in state if (m := VIT_LAYER_RE.match(k))}
        if layers and max(layers) + 1 == config.vit.num_layers_used + 1:
            warnings.warn(f"{directory}/vit_config.json holds an already truncated layer count "
                          f"({config.vit.num_hidden_layers}); the weights have {max(layers) + 1} ViT layers, so "
                          f"the count is corrected (UniMedVL double-truncation pitfall, docs/upstream-compat.md#vit-layer-count)")
            config.vit.num_hidden_layers += 1
    emb = state.get("language_model.model.embed_tokens.weight")
    files_vocab = emb.shape[0] if emb is not None else None
    if files_vocab is not None and files_vocab != config.llm.vocab_size:
        config.llm.vocab_size = files_vocab  # upstream updates vocab_size after resizing; trust the weights
    if strict:
        with torch.device("meta"):
            model = UnifiedModel(config)
        model = model.to_empty(device=device)
        model.reset_buffers()
    else:
        model = UnifiedModel(config).to(device)
    load_weights(model, state, strict=strict)
    if config.visual_gen and not any(k.startswith("vae_model.") for k in state):
        vae_file = next((directory / n for n in VAE_FILES if (directory / n).exists()), None)
        if vae_file is None:
            if strict:
                raise CheckpointError(f"{directory}: visual_gen is on but there is no VAE: expected ae.safetensors "
                                      f"or vae_model.safetensors (or load with visual_gen=False)")
        else:
            load_vae_weights(model.vae_model, vae_file, strict=strict)
    if config.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    if tokenizer is None and any((directory / f).exists() for f in ("tokenizer.json", "vocab.json",
                                                                     "tokenizer_config.json")):
        from datasets_catalog.tokenizer import TextTokenizer

        tokenizer = TextTokenizer.from_dir(directory)
    if tokenizer is not None:
        model.adapt_to_tokenizer(tokenizer)  # resizes only when special tokens were really added (docs/upstream-compat.md#special-tokens)
    if dtype is not None:
        model = model.to(dtype)
    return model
