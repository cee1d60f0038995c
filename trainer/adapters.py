"""A LoRA run in the trainer (`--finetuning_type lora`): base weights from --model_path, adapters injected
through peft (model/adapters.py), an EMA of the adapter weights only, and adapter checkpoints.

A LoRA checkpoint `{step:07d}/` holds adapter_model.safetensors, ema_adapter_model.safetensors,
adapter_config.json, base_model.json (base path, weights file, sha256), the optimizer shards, scheduler,
stream states and inference files, but no full weights. Resuming (auto_resume or a Ray Train restart)
rebuilds the base from --model_path, checks its sha256 against base_model.json, then loads the adapters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from trainer.checkpoint import local as ck
from trainer.config import TrainConfig, lora_settings


class AdapterEMA:
    """EMA of the trainable (adapter) parameters only, {parameter name: tensor}; duck-typed for
    trainer.ema.ema_update (named_parameters) and the loop (train, to)."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.params.items())

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(self.params.values())

    def train(self, mode: bool = True) -> "AdapterEMA":
        return self

    def to(self, device) -> "AdapterEMA":
        self.params = {k: v.to(device) for k, v in self.params.items()}
        return self


class LoraRun:
    """The LoRA side of one rank's run: set up before wrapping, EMA placement after, files at save."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.settings = lora_settings(cfg)
        self.peft_config = None
        self.base_ref: Optional[dict] = None

    def base_source(self) -> tuple[Optional[Path], str]:
        t = self.cfg.train
        path = Path(self.cfg.model.model_path) if self.cfg.model.model_path else None
        return path, (ck.EMA_FILE if t.finetune_from_ema else ck.MODEL_FILE)

    def load(self, model: nn.Module, plan: ck.ResumePlan, log: Callable[[str], None]) -> AdapterEMA:
        """Base weights, freeze flags, adapters (initialised from global_seed, the same on every rank), then
        the adapter and EMA-adapter weights of the checkpoint being resumed, if any."""
        from model.adapters import (ADAPTER_FILE, EMA_ADAPTER_FILE, AdapterError, adapter_modules, base_reference,
                                    inject_lora,
                                    is_adapter_dir, load_adapter_state, lora_config, read_base_reference)
        from model.checkpoint import load_vae_weights, read_weights
        from trainer.model_setup import apply_freeze_flags

        base_dir, weights = self.base_source()
        if self.cfg.model.model_path:
            ck.load_weights_checked(model, base_dir, weights, strict=False, log=log)
            self.base_ref = base_reference(base_dir, weights)
        # else: the model builder supplied the base (benchmarks/gpu_check.py); no checkpoint can name it
        if self.cfg.model.vae_path and getattr(model, "vae_model", None) is not None:
            load_vae_weights(model.vae_model, self.cfg.model.vae_path, strict=True)
        apply_freeze_flags(model, self.cfg)
        try:
            self.peft_config = lora_config(model, self.settings)
        except AdapterError as exc:
            raise ck.ResumeError(str(exc)) from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.global_seed)
            inject_lora(model, self.peft_config)
        ema = AdapterEMA({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        n_train = sum(p.numel() for p in ema.params.values())
        n_all = sum(p.numel() for p in model.parameters())
        log(f"LoRA r={self.settings.rank} alpha={self.settings.lora_alpha:g} experts={self.settings.experts}: "
            f"{len(adapter_modules(model))} Linear layers, {n_train:,} trainable of {n_all:,} parameters "
            f"({100 * n_train / n_all:.3f}%); base {base_dir}/{weights}")
        source = plan.source
        if source is not None and is_adapter_dir(source):
            ref = read_base_reference(source)
            if self.base_ref is None:
                raise ck.ResumeError(f"{source} is an adapter checkpoint of {ref['path']}: pass that base as "
                                     f"--model_path")
            if ref["sha256"] != self.base_ref["sha256"]:
                raise ck.ResumeError(f"{source}: trained on base {ref['path']}/{ref['weights_file']} (sha256 "
                                     f"{ref['sha256'][:12]}…) but --model_path gives {base_dir}/{weights} (sha256 "
                                     f"{self.base_ref['sha256'][:12]}…); pass the same base checkpoint")
            try:
                load_adapter_state(model, read_weights(source / ADAPTER_FILE), str(source / ADAPTER_FILE))
                ema_file = source / EMA_ADAPTER_FILE
                _load_named(ema.params, read_weights(ema_file if ema_file.is_file() else source / ADAPTER_FILE))
            except AdapterError as exc:
                raise ck.ResumeError(str(exc)) from None
            log(f"adapters and EMA adapters from {source}")
        elif source is not None and plan.load_train_state:
            raise ck.ResumeError(f"{source} is not a LoRA checkpoint (no adapter_model.safetensors); a LoRA run "
                                 f"resumes from its own checkpoints only")
        return ema

    def place_ema(self, model: nn.Module, ema: AdapterEMA) -> AdapterEMA:
        """After wrapping: each EMA tensor on its parameter's device, sharded like it under FSDP2."""
        try:
            from torch.distributed.tensor import DTensor, distribute_tensor
        except ImportError:  # pragma: no cover
            DTensor = None
        params = dict(model.named_parameters())
        out = {}
        for name, value in ema.params.items():
            p = params[name]
            if DTensor is not None and isinstance(p, DTensor):
                out[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
            else:
                out[name] = value.to(p.device)
        return AdapterEMA(out)

    def full_states(self, model: nn.Module, ema: AdapterEMA, rank: int) -> tuple[Optional[dict], Optional[dict]]:
        """Full adapter and EMA-adapter tensors in PEFT's key format on rank 0 (collective under FSDP2)."""
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return (_gather(trainable, rank), _gather(ema.params, rank))

    def write(self, folder: Path, model_state: dict, ema_state: dict) -> list[str]:
        from model.adapters import to_peft_keys, write_adapter_files

        if self.peft_config is None or self.base_ref is None:
            raise RuntimeError("a LoRA run without --model_path (a built-in base) cannot write an adapter "
                               "checkpoint: its base is not a checkpoint directory")
        return write_adapter_files(folder, self.peft_config, to_peft_keys(model_state), to_peft_keys(ema_state),
                                   self.base_ref)


def _gather(tensors: dict[str, torch.Tensor], rank: int) -> Optional[dict[str, torch.Tensor]]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = None
    out = {}
    for name, t in tensors.items():
        full = t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t
        out[name] = full.detach().cpu().clone()
    return out if rank == 0 else None


def _load_named(params: dict[str, torch.Tensor], peft_state: dict[str, torch.Tensor]) -> None:
    from model.adapters import AdapterError, from_peft_keys

    named = from_peft_keys(peft_state)
    if named.keys() != params.keys():
        raise AdapterError("the EMA adapter file does not match the adapter layout")
    with torch.no_grad():
        for k, v in named.items():
            params[k].copy_(v.to(params[k].dtype))
