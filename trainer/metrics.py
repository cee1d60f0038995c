"""Training metrics: a per-window accumulator reduced over ranks, and sinks (console, metrics.jsonl,
TensorBoard). MFU uses upstream's formula (docs/upstream-compat.md#logging-and-mfu)."""
from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from trainer.loss import all_reduce_sum

# dense bf16 peak TFLOPs per device, by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 125.0), ("A10", 125.0),
               ("L4", 121.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0), ("T4", 65.0))


def peak_tflops_from_name(name: str) -> float:
    for key, value in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return value
    return 0.0


def dense_params_for_flops(llm: Any) -> float:
    """N_dense = L·(3·H·I + H·(q + k + v + o)) + 2·V·H from an LLM config (attribute names as Qwen2's)."""
    H = llm.hidden_size
    L = llm.num_hidden_layers
    I = llm.intermediate_size
    n_heads = llm.num_attention_heads
    n_kv = getattr(llm, "num_key_value_heads", None) or n_heads
    d = getattr(llm, "head_dim", None) or H // n_heads
    q, k, v, o = n_heads * d, n_kv * d, n_kv * d, n_heads * d
    return L * (3 * H * I + H * (q + k + v + o)) + 2 * llm.vocab_size * H


def step_flops(llm: Any, tokens: float, sum_len_sq: float) -> float:
    """6·N_dense per token plus 12·d_head·n_heads·L·Σ(sample_len²) (upstream's count)."""
    n_heads = llm.num_attention_heads
    d = getattr(llm, "head_dim", None) or llm.hidden_size // n_heads
    return 6.0 * dense_params_for_flops(llm) * tokens + 12.0 * d * n_heads * llm.num_hidden_layers * sum_len_sq


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@dataclass
class Window:
    """Sums over the steps since the last log line, on this rank."""
    groups: Sequence[str]
    steps: int = 0
    ce_sum: float = 0.0
    ce_denom: float = 0.0
    mse_sum: float = 0.0
    mse_denom: float = 0.0
    tokens: float = 0.0
    samples: float = 0.0
    batches: float = 0.0
    packing_eff_sum: float = 0.0
    sum_len_sq: float = 0.0
    step_time: float = 0.0
    data_wait: float = 0.0
    skipped: float = 0.0
    grad_norm_sum: float = 0.0
    group_tokens: dict[str, float] = field(default_factory=dict)
    group_samples: dict[str, float] = field(default_factory=dict)

    def add_batch(self, batch) -> None:
        m = batch.metrics or {}
        self.batches += 1
        self.tokens += float(batch.sequence_length)
        lens = list(m.get("sample_lens_real", batch.sample_lens))
        self.samples += float(m.get("num_samples", len(batch.batch_data_indexes) or len(lens)))
        self.sum_len_sq += float(sum(x * x for x in lens))
        self.packing_eff_sum += float(m.get("packing_efficiency", 0.0))
        self.skipped += float(m.get("samples_skipped_too_long", 0))
        for g, v in (m.get("tokens_per_group") or {}).items():
            self.group_tokens[g] = self.group_tokens.get(g, 0.0) + float(v)
        for g, v in (m.get("samples_per_group") or {}).items():
            self.group_samples[g] = self.group_samples.get(g, 0.0) + float(v)

    def reduce(self) -> dict[str, float]:
        """Sum over ranks with one all-reduce; returns summed values (max for step time)."""
        keys = ["steps", "ce_sum", "ce_denom", "mse_sum", "mse_denom", "tokens", "samples", "batches",
                "packing_eff_sum", "sum_len_sq", "step_time", "data_wait", "skipped", "grad_norm_sum"]
        vals = [float(getattr(self, k)) for k in keys]
        vals += [self.group_tokens.get(g, 0.0) for g in self.groups]
        vals += [self.group_samples.get(g, 0.0) for g in self.groups]
        t = torch.tensor(vals, dtype=torch.float64)
        all_reduce_sum(t)
        out = dict(zip(keys, t[: len(keys)].tolist()))
        n = len(self.groups)
        out["group_tokens"] = dict(zip(self.groups, t[len(keys): len(keys) + n].tolist()))
        out["group_samples"] = dict(zip(self.groups, t[len(keys) + n:].tolist()))
        return out


def summarise(red: dict, *, world: int, step: int, lr: float, lrs: dict[str, float], wall: float,
              device: torch.device, llm_config: Any = None, peak_tflops: float = 0.0) -> dict[str, Any]:
    """Turn reduced window sums into the logged record."""
    steps = max(1.0, red["steps"] / world)  # every rank counted its steps
    rec: dict[str, Any] = {"step": step, "lr": lr}
    rec.update({f"lr_{k}": v for k, v in lrs.items()})
    rec["ce"] = red["ce_sum"] / red["ce_denom"] if red["ce_denom"] > 0 else None
    rec["mse"] = red["mse_sum"] / red["mse_denom"] if red["mse_denom"] > 0 else None
    rec["grad_norm"] = red["grad_norm_sum"] / red["steps"] if red["steps"] else None
    rec["total_ce_tokens"] = red["ce_denom"]
    rec["total_mse_tokens"] = red["mse_denom"]
    rec["tokens_per_step"] = red["tokens"] / steps
    rec["tokens_per_sec"] = red["tokens"] / wall if wall > 0 else 0.0
    rec["samples_per_sec"] = red["samples"] / wall if wall > 0 else 0.0
    rec["total_samples"] = red["samples"]
    rec["packing_efficiency"] = red["packing_eff_sum"] / red["batches"] if red["batches"] else None
    rec["samples_skipped_too_long"] = red["skipped"]
    rec["data_wait_fraction"] = red["data_wait"] / red["step_time"] if red["step_time"] > 0 else 0.0
    rec["step_time_s"] = red["step_time"] / red["steps"] if red["steps"] else 0.0
    total_gt = sum(red["group_tokens"].values())
    total_gs = sum(red["group_samples"].values())
    for g in red["group_tokens"]:
        rec[f"share_tokens/{g}"] = red["group_tokens"][g] / total_gt if total_gt else 0.0
        rec[f"share_samples/{g}"] = red["group_samples"][g] / total_gs if total_gs else 0.0
    rec["peak_mem_mib"] = peak_memory_mib(device)
    if llm_config is not None and wall > 0:
        flops = step_flops(llm_config, red["tokens"], red["sum_len_sq"])
        rec["actual_tflops"] = flops / wall / 1e12 / world
        if peak_tflops > 0:
            rec["mfu"] = flops / wall / (peak_tflops * 1e12 * world)
    return rec


class MetricsSink:
    """Rank 0's outputs: one console line, one JSON line in results_dir/metrics.jsonl, TensorBoard scalars."""

    def __init__(self, results_dir: Path, *, tensorboard: bool = True, enabled: bool = True,
                 print_fn=print) -> None:
        self.enabled = enabled
        self.print = print_fn
        self.path = Path(results_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            Path(results_dir).mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(log_dir=str(Path(results_dir) / "tensorboard"))
                except Exception as exc:  # tensorboard missing: keep training, say so once
                    self.print(f"[metrics] TensorBoard disabled: {exc}")

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {**rec, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time") \
                        and math.isfinite(float(v)):
                    self.tb.add_scalar(f"train/{k}", float(v), rec["step"])
            self.tb.flush()
        self.print(format_line(rec))

    def log_extra(self, rec: dict[str, Any], line: str) -> None:
        """A record that is not a training window (evaluation): metrics.jsonl, TensorBoard under its own
        keys (eval/ce, ...), and `line` on the console."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({**rec, "time": time.time()}, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(float(v)):
                    self.tb.add_scalar(k, float(v), rec["step"])
            self.tb.flush()
        self.print(line)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_line(rec: dict[str, Any]) -> str:
    parts = [f"step {rec['step']:>6}", f"ce {_fmt(rec.get('ce'), '.4f')}", f"mse {_fmt(rec.get('mse'), '.4f')}",
             f"lr {rec['lr']:.2e}", f"gnorm {_fmt(rec.get('grad_norm'), '.3f')}",
             f"tok/s {rec.get('tokens_per_sec', 0):.0f}", f"samp/s {rec.get('samples_per_sec', 0):.2f}",
             f"pack {_fmt(rec.get('packing_efficiency'), '.2f')}",
             f"wait {100 * rec.get('data_wait_fraction', 0):.1f}%", f"mem {rec.get('peak_mem_mib', 0):.0f}MiB"]
    if "mfu" in rec:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    shares = {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith("share_tokens/")}
    if shares:
        parts.append("mix " + " ".join(f"{g}={v:.2f}" for g, v in shares.items()))
    return " | ".join(parts)
