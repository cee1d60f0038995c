"""LoRA adapters on the unified model through the `peft` library: which Linear layers get adapters, the
adapter files in PEFT's own format, and merging an adapter into the base weights.

Adapters are injected in place (`peft.inject_adapter_in_model`), so every other parameter keeps its
checkpoint name and the trainer's optimizer groups, EMA and FSDP units work unchanged. An adapter
directory holds `adapter_model.safetensors` + `adapter_config.json` (what `peft.PeftModel.from_pretrained`
loads onto a freshly built base), `ema_adapter_model.safetensors` (the EMA adapter, same format) and
`base_model.json` (the base checkpoint's path, weights file and sha256, checked on load).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from pipelines.storage.uris import write_text_atomic

ADAPTER_FILE = "adapter_model.safetensors"
EMA_ADAPTER_FILE = "ema_adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_REF_FILE = "base_model.json"
PEFT_PREFIX = "base_model.model."          # the key prefix PeftModel.save_pretrained writes
EXPERTS = ("und", "gen", "both")
FINETUNING_TYPES = ("full", "freeze", "lora")


class AdapterError(ValueError):
    """A LoRA setting or an adapter directory that cannot be used; the message says what to change."""


@dataclass
class LoraSettings:
    """The LoRA flags (lora_rank, lora_alpha, lora_dropout, lora_target) plus the MoT choices
    (docs/training.md#parameter-efficient-fine-tuning-lora)."""
    rank: int = 8
    alpha: Optional[float] = None      # default 2 x rank
    dropout: float = 0.0
    target: str = "all"                # "all" = every Linear of the decoder layers, or a comma list of names
    experts: str = "both"              # und | gen | both: which twin of each MoT module gets adapters
    vit: bool = False                  # adapters on the ViT encoder's Linear layers too
    connectors: bool = False           # adapters on connector (ViT -> LLM), vae2llm and llm2vae

    def check(self) -> None:
        if self.rank < 1:
            raise AdapterError(f"lora_rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        if self.experts not in EXPERTS:
            raise AdapterError(f"lora_experts must be one of {', '.join(EXPERTS)}, got {self.experts!r}")
        if not self.target.strip():
            raise AdapterError("lora_target is empty: use all or a comma list of module names (q_proj,v_proj)")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank


def _is_gen(name: str) -> bool:
    return "_moe_gen" in name


def target_names(model: nn.Module, s: LoraSettings) -> list[str]:
    """Full names of the Linear modules that get adapters. Decoder-layer Linears are filtered by the expert
    choice (`*_moe_gen` modules are the generation twins); `lora_target` names match a module's last name
    component with the `_moe_gen` suffix removed, so `q_proj` means both twins' q projections."""
    s.check()
    wanted = None if s.target.strip() == "all" else {t.strip() for t in s.target.split(",") if t.strip()}
    out, seen_short = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name or name.endswith(".base_layer"):
            continue   # (the parts of an already injected adapter)
        short = name.rsplit(".", 1)[-1].replace("_moe_gen", "")
        if name.startswith("language_model.model.layers."):
            seen_short.add(short)
            if wanted is not None and short not in wanted:
                continue
            gen = _is_gen(name)
            if (s.experts == "und" and gen) or (s.experts == "gen" and not gen):
                continue
            out.append(name)
        elif s.vit and name.startswith("vit_model.vision_model.encoder.layers."):
            out.append(name)
        elif s.connectors and name.startswith(("connector.", "vae2llm", "llm2vae")):
            out.append(name)
    if wanted is not None and wanted - seen_short:
        raise AdapterError(f"lora_target names {sorted(wanted - seen_short)} match no Linear of the decoder layers; "
                           f"known: {', '.join(sorted(seen_short))}")
    if s.experts == "gen" and not any(_is_gen(n) for n in out):
        raise AdapterError("lora_experts gen: this layout has no generation twins (*_moe_gen); use und or both")
    if not out:
        raise AdapterError("the LoRA settings select no Linear layer")
    return out


def lora_config(model: nn.Module, s: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=s.rank, lora_alpha=s.lora_alpha, lora_dropout=s.dropout,
                      target_modules=target_names(model, s), bias="none")


def inject_lora(model: nn.Module, config) -> nn.Module:
    """Freeze every parameter, then add the adapters in place (peft); only adapter weights train.
    Adapter A matrices get peft's Kaiming init from torch's global RNG (seeded by the caller), B starts at
    zero, so the adapted model starts equal to the base."""
    from peft import inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    return inject_adapter_in_model(config, model)


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def to_peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names (`...q_proj.lora_A.default.weight`) -> PEFT file keys
    (`base_model.model....q_proj.lora_A.weight`)."""
    return {PEFT_PREFIX + k.replace(".default.", "."): v for k, v in state.items()}


def from_peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith(PEFT_PREFIX):
            k = k[len(PEFT_PREFIX):]
        for part in (".lora_A.", ".lora_B."):
            k = k.replace(part, part + "default.")
        out[k] = v
    return out


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in PEFT's file format (what adapter_model.safetensors holds)."""
    from peft import get_peft_model_state_dict

    return {PEFT_PREFIX + k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "adapter") -> int:
    """Copy PEFT-format adapter weights into an injected model; every adapter tensor must be there."""
    own = dict(model.named_parameters())
    named = from_peft_keys(state)
    expected = {n for n in own if ".lora_A." in n or ".lora_B." in n}
    missing, unexpected = sorted(expected - named.keys()), sorted(named.keys() - expected)
    if missing or unexpected:
        raise AdapterError(f"{where}: does not match the adapter layout ({len(missing)} missing e.g. {missing[:2]}, "
                           f"{len(unexpected)} unexpected e.g. {unexpected[:2]}); same lora_rank/target/experts?")
    with torch.no_grad():
        for k, v in named.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise AdapterError(f"{where}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))
    return len(named)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear (peft's `merge`) and put the plain Linear back, so the
    result has the base model's state-dict names."""
    for name, module in adapter_modules(model):
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


# ---- the base reference ---------------------------------------------------------------------------------
def weights_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def base_reference(base_dir: str | Path, weights_file: str) -> dict[str, str]:
    base_dir = Path(base_dir).resolve()
    return {"path": str(base_dir), "weights_file": weights_file, "sha256": weights_sha256(base_dir / weights_file)}


def read_base_reference(adapter_dir: str | Path) -> dict[str, str]:
    f = Path(adapter_dir) / BASE_REF_FILE
    try:
        ref = json.loads(f.read_text())
        return {k: str(ref[k]) for k in ("path", "weights_file", "sha256")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{f}: unreadable base reference ({exc}); an adapter checkpoint names its base "
                           f"checkpoint there") from None


def check_base(ref: dict[str, str], base_dir: str | Path, where: str) -> None:
    """The base weights must be the ones the adapter was trained on (same sha256)."""
    path = Path(base_dir) / ref["weights_file"]
    if not path.is_file():
        raise AdapterError(f"{where}: base weights {path} not found; the adapter was trained on {ref['path']}")
    got = weights_sha256(path)
    if got != ref["sha256"]:
        raise AdapterError(f"{where}: base weights {path} have sha256 {got[:12]}…, the adapter was trained on "
                           f"{ref['sha256'][:12]}… ({ref['path']}); pass the same base checkpoint")


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG_FILE).is_file() and (path / ADAPTER_FILE).is_file()


def write_adapter_files(folder: str | Path, config, model_state: dict[str, torch.Tensor],
                        ema_state: Optional[dict[str, torch.Tensor]], base_ref: dict[str, str]) -> list[str]:
    """adapter_model.safetensors, ema_adapter_model.safetensors, adapter_config.json, base_model.json
    (each written elsewhere, then renamed); returns the names."""
    from .checkpoint import save_weights

    folder = Path(folder)
    save_weights(model_state, folder / ADAPTER_FILE)
    names = [ADAPTER_FILE]
    if ema_state is not None:
        save_weights(ema_state, folder / EMA_ADAPTER_FILE)
        names.append(EMA_ADAPTER_FILE)
    cfg = config.to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    write_text_atomic(folder / ADAPTER_CONFIG_FILE, json.dumps(cfg, indent=2, sort_keys=True, default=_json_default))
    write_text_atomic(folder / BASE_REF_FILE, json.dumps(base_ref, indent=2, sort_keys=True))
    return names + [ADAPTER_CONFIG_FILE, BASE_REF_FILE]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def read_adapter_config(adapter_dir: str | Path):
    from peft import LoraConfig

    f = Path(adapter_dir) / ADAPTER_CONFIG_FILE
    try:
        raw = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{f}: unreadable adapter config ({exc})") from None
    if raw.get("peft_type") not in (None, "LORA"):
        raise AdapterError(f"{f}: peft_type {raw.get('peft_type')!r} is not supported (LoRA only)")
    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in raw.items() if k in known and k not in ("peft_type", "task_type")})


def load_adapted_model(adapter_dir: str | Path, *, use_ema: bool = True, base_dir: Optional[str | Path] = None,
                       merge: bool = True, **load_kw: Any) -> nn.Module:
    """The base checkpoint named in base_model.json (or `base_dir`), checked by sha256, with the adapter
    (EMA by default) applied; merged into the base weights unless merge=False. `load_kw` go to
    `model.checkpoint.load_model_from_dir` (device, dtype, visual_gen, tokenizer)."""
    from .checkpoint import load_model_from_dir, read_weights

    adapter_dir = Path(adapter_dir)
    ref = read_base_reference(adapter_dir)
    base = Path(base_dir) if base_dir is not None else Path(ref["path"])
    check_base(ref, base, str(adapter_dir))
    dtype = load_kw.pop("dtype", None)
    model = load_model_from_dir(base, use_ema=ref["weights_file"] == "ema.safetensors", **load_kw)
    config = read_adapter_config(adapter_dir)
    name = EMA_ADAPTER_FILE if use_ema and (adapter_dir / EMA_ADAPTER_FILE).is_file() else ADAPTER_FILE
    state = read_weights(adapter_dir / name)
    # components switched off for this use (VQA loads without the generation path) drop their adapters
    present = {n for n, _ in model.named_modules()}
    # (peft may have shortened a long target list to suffixes: match the way peft does)
    config.target_modules = sorted(t for t in config.target_modules
                                   if any(n == t or n.endswith("." + t) for n in present))
    state = {k: v for k, v in state.items() if k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] in present}
    inject_lora(model, config)
    load_adapter_state(model, state, where=str(adapter_dir / name))
    if merge:
        merge_adapters(model)
    if dtype is not None:
        model = model.to(dtype)
    return model


def export_merged(adapter_dir: str | Path, out_dir: str | Path, *, use_ema: bool = True,
                  base_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Merge the adapter (EMA by default) into the base weights and write a full UniMedVL-layout directory:
    model.safetensors and ema.safetensors (both the merged weights), the base's VAE file, llm/vit configs,
    tokenizer, the adapter's training_args.json (inference defaults to the transforms recorded there) and
    merged_from.json. Written into a temporary sibling directory, then renamed."""
    import os
    import shutil
    import tempfile

    from .checkpoint import VAE_FILES, save_weights, write_inference_files

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not is_adapter_dir(adapter_dir):
        raise AdapterError(f"{adapter_dir}: not an adapter checkpoint (expected {ADAPTER_FILE} and "
                           f"{ADAPTER_CONFIG_FILE}, as a --finetuning_type lora run writes)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AdapterError(f"--out {out_dir} exists and is not empty; pass a new directory")
    ref = read_base_reference(adapter_dir)
    base = Path(base_dir) if base_dir is not None else Path(ref["path"])
    tokenizer = None
    if any((adapter_dir / f).exists() for f in ("tokenizer.json", "vocab.json", "medloom_tokenizer.json")):
        from datasets_catalog.tokenizer import TextTokenizer

        tokenizer = TextTokenizer.from_dir(adapter_dir)
    model = load_adapted_model(adapter_dir, use_ema=use_ema, base_dir=base, tokenizer=tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=str(out_dir.parent)))
    try:
        save_weights(model, tmp / "model.safetensors", include_vae=False)
        shutil.copyfile(tmp / "model.safetensors", tmp / "ema.safetensors")
        vae = next((base / n for n in VAE_FILES if (base / n).is_file()), None)
        if vae is not None:
            shutil.copyfile(vae, tmp / vae.name)
        write_inference_files(tmp, model.config, tokenizer)
        if (adapter_dir / "training_args.json").is_file():   # the transforms it trained at (docs/checkpoints.md)
            shutil.copyfile(adapter_dir / "training_args.json", tmp / "training_args.json")
        info = {"adapter": str(adapter_dir.resolve()), "adapter_weights": EMA_ADAPTER_FILE if use_ema and
                (adapter_dir / EMA_ADAPTER_FILE).is_file() else ADAPTER_FILE, "base": ref,
                "parameters": sum(p.numel() for p in model.parameters())}
        write_text_atomic(tmp / "merged_from.json", json.dumps(info, indent=2, sort_keys=True))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "out": str(out_dir)}
