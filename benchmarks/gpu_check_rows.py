"""The rows of `benchmarks/gpu_check.py`, one function each, all through the project's own code.

Training rows run `trainer.loop.Trainer` in this process (world size 1: the trainer makes its own one-rank
process group, NCCL on CUDA, gloo on CPU), i.e. the code each Ray Train worker runs: model setup, FSDP2
wrapping (bf16 parameters and reductions, activation checkpointing on decoder and ViT layers), loss, AdamW,
EMA, the mixture stream in loader processes, and (row f) checkpoint save and resume. Nothing here imports
Ray, pydantic, pydicom or nibabel.

`CheckTrainer` changes two things only: with `gpu_like` on a CPU (the dry run) it turns on the switches the
trainer gates on CUDA (bf16 FSDP2 mixed precision, bf16 autocast, activation checkpointing), so the dry run
takes the GPU's dtype path; with `skip_save` it does not write checkpoints (row b: a full checkpoint of the
4-layer 7B-width model is ~30 GB of disk and minutes of I/O; row f saves and resumes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from trainer.loop import Trainer, _single_process_group


# -- plumbing ----------------------------------------------------------------------------------------
class RowSkipped(Exception):
    """A row that cannot run here; its message is the row's result."""


@dataclass
class Row:
    key: str                      # "a", "b8192", ...
    what: str                     # one line: what the row measures
    status: str = "pending"       # ok | FAIL | not met | skipped | n/a
    result: str = ""              # the one-line result shown in the table
    target: str = ""              # the target and whether it is met
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compiled_graphs() -> int:
    """Graphs compiled so far by torch.compile in this process (flex attention is the only user here)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - internal API moved
        return -1


class CheckTrainer(Trainer):
    """The trainer as Ray Train runs it, plus the two switches described in the module docstring."""

    gpu_like = False
    skip_save = False

    def setup_devices(self) -> None:
        super().setup_devices()
        if self.gpu_like and not self.use_cuda:
            self.amp = torch.autocast("cpu", dtype=torch.bfloat16)

    def _wrap_fsdp(self):
        if not (self.gpu_like and not self.use_cuda):
            return super()._wrap_fsdp()
        if not dist.is_initialized():
            _single_process_group("gloo")
            self.own_group = True
        self.use_cuda = True      # only the wrapping reads it: bf16 params/reductions, activation checkpointing
        try:
            return super()._wrap_fsdp()
        finally:
            self.use_cuda = False

    def save(self):
        if self.skip_save:
            return None
        return super().save()


def run_trainer(ctx, cfg, mc, *, gpu_like: bool, skip_save: bool, quiet: bool = False):
    """One training run through CheckTrainer; returns (LoopResult, metrics records, wall seconds)."""
    from model.unified import UnifiedModel

    def builder(_cfg):
        # built straight on the GPU (seconds instead of a minute of CPU init per run); fully_shard then
        # shards it in place, as it would move a CPU-built model
        with (torch.device(ctx.device) if ctx.device.type == "cuda" else contextlib.nullcontext()):
            model = UnifiedModel(mc)
        model.adapt_to_tokenizer(ctx.tokenizer)
        model.init_moe()
        return model, mc, ctx.tokenizer

    trainer = CheckTrainer(cfg, model_builder=builder, print_fn=(lambda s: None) if quiet else print)
    trainer.gpu_like, trainer.skip_save = gpu_like, skip_save
    t0 = time.perf_counter()
    result = trainer.setup().run()
    wall = time.perf_counter() - t0
    path = cfg.results_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    del trainer
    return result, recs, wall


# -- (a) attention backends --------------------------------------------------------------------------
def sample_pack(ctx, n_tokens: int):
    """One real pack of ~n_tokens from the mixture stream (the packing the training rows use)."""
    from pipelines.mixture.stream import MixtureStream
    from trainer.data import load_mixture
    from trainer.model_setup import packing_config

    cfg = ctx.train_config(n_tokens, ctx.work / f"pack{n_tokens}", steps=1, log_every=1)
    stream = MixtureStream(load_mixture(str(cfg.mixture_path)), packing_config(cfg, ctx.mc), ctx.tokenizer,
                           seed=cfg.data.data_seed)
    return next(iter(stream))


def attention_row(ctx, n_tokens: int) -> dict:
    """SDPA with per-sample masks vs flex vs the varlen plan (pure torch) vs flash-attn varlen (when
    importable) on one real pack; q/k/v at the LLM's head geometry. On CUDA: bf16 under autocast, as the
    training step calls them; on CPU (dry run): fp32, flex forward only."""
    from model.attention import PackedAttention, TokenLayout, flash_attn_available

    dev = ctx.device
    batch = sample_pack(ctx, n_tokens)
    L = batch.sequence_length
    layout = TokenLayout.build(L, batch.sample_lens, batch.split_lens, batch.attn_modes, dev)
    llm = ctx.mc.llm
    heads, kv_heads, d = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q0 = torch.randn(L, heads, d, generator=g).to(dev, dtype)
    k0 = torch.randn(L, kv_heads, d, generator=g).to(dev, dtype)
    v0 = torch.randn(L, kv_heads, d, generator=g).to(dev, dtype)
    gout = torch.randn(L, heads, d, generator=g).to(dev, torch.float32)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    attns: dict[str, PackedAttention] = {}

    def call(backend: str, with_grad: bool, q=q0, k=k0, v=v0, autocast: bool = True):
        """One attention call; masks and plans are built on a backend's first call and kept, as the training
        step keeps them across the layers of one pack."""
        q, k, v = (t.detach().clone().requires_grad_(with_grad) for t in (q, k, v))
        attn = attns.setdefault(backend, PackedAttention(layout, backend))
        with (amp if autocast else contextlib.nullcontext()):
            out = attn(q, k, v)
        grads = None
        if with_grad:
            (out.float() * gout).sum().backward()
            grads = (q.grad, k.grad, v.grad)
        return out.detach(), grads

    def timed(backend: str, with_grad: bool, reps: int) -> float:
        times = []
        for _ in range(reps):
            sync(dev)
            t0 = time.perf_counter()
            call(backend, with_grad)
            sync(dev)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # the fp32 reference: SDPA with masks on fp32 inputs (the bf16 noise floor is SDPA-bf16 against it)
    ref, ref_grads = call("sdpa", True, q0.float(), k0.float(), v0.float(), autocast=False)
    attns.clear()
    backends = ["sdpa", "flex", "varlen"] + (["flash"] if flash_attn_available() else [])
    out: dict[str, Any] = {"tokens": L, "samples": len(layout.sample_lens), "splits": len(layout.split_lens),
                           "modes": {m: layout.attn_modes.count(m) for m in ("causal", "full", "noise")},
                           "dtype": str(dtype).replace("torch.", ""), "heads": heads, "kv_heads": kv_heads,
                           "head_dim": d, "backends": {}}
    sdpa_out = sdpa_grads = None
    reps = 3 if dev.type == "cuda" else 1
    for name in backends:
        entry: dict[str, Any] = {}
        graphs0 = compiled_graphs()
        try:
            t0 = time.perf_counter()
            with_grad = True
            try:
                o, grads = call(name, True)
            except (NotImplementedError, RuntimeError) as exc:
                if dev.type == "cuda":
                    raise
                with_grad = False      # flex has no CPU backward: forward only in the dry run
                entry["backward"] = f"not on CPU ({type(exc).__name__})"
                o, grads = call(name, False)
            sync(dev)
            entry["first_call_s"] = time.perf_counter() - t0   # masks/plans, and torch.compile for flex on CUDA
            entry["fwd_ms"] = 1e3 * timed(name, False, reps)
            if with_grad:
                entry["fwd_bwd_ms"] = 1e3 * timed(name, True, reps)
            entry["compiled_graphs"] = compiled_graphs() - graphs0
            entry["max_abs_vs_fp32"] = float((o.float() - ref).abs().max())
            if grads is not None:
                entry["grad_max_abs_vs_fp32"] = max(float((a.float() - b).abs().max())
                                                    for a, b in zip(grads, ref_grads))
            if name == "sdpa":
                sdpa_out, sdpa_grads = o, grads
                entry["max_abs_vs_sdpa"] = 0.0
            else:
                entry["max_abs_vs_sdpa"] = float((o.float() - sdpa_out.float()).abs().max())
                if grads is not None and sdpa_grads is not None:
                    entry["grad_max_abs_vs_sdpa"] = max(float((a.float() - b.float()).abs().max())
                                                        for a, b in zip(grads, sdpa_grads))
            entry["ok"] = True
        except Exception as exc:  # a backend that fails is a result (e.g. no C compiler for Triton)
            entry = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        out["backends"][name] = entry
        free_memory()
    floor = out["backends"]["sdpa"].get("max_abs_vs_fp32", 0.0)
    # agreement rule: no backend is more than twice as far from the fp32 reference as bf16 SDPA is (plus a
    # small absolute slack); in fp32 (dry run) that is ~1e-6, so the slack is what bounds it
    slack = 1e-3 if dtype == torch.bfloat16 else 1e-4
    for name, entry in out["backends"].items():
        if entry.get("ok"):
            entry["agrees"] = entry["max_abs_vs_fp32"] <= 2 * floor + slack
    out["noise_floor_bf16_sdpa_vs_fp32"] = floor if dtype == torch.bfloat16 else None
    return out


# -- (b)/(d) training throughput ---------------------------------------------------------------------
def training_row(ctx, n_tokens: int, steps: int, log_every: int, lora_rank: Optional[int] = None) -> dict:
    """Steps of the 7B-width MoT model at ~n_tokens per pack; throughput, MFU, data wait from the
    trainer's own metrics windows, excluding the first window (compilation, loader start-up). With
    lora_rank: the trainer's LoRA path (peft adapters on every decoder Linear of both experts) on the
    builder's randomly initialised base (no --model_path, so no checkpoint is written)."""
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    graphs0 = compiled_graphs()
    tag = f"lora{n_tokens}" if lora_rank else f"train{n_tokens}"
    cfg = ctx.train_config(n_tokens, ctx.work / tag, steps=steps, log_every=log_every)
    if lora_rank:
        cfg.train.finetuning_type, cfg.train.lora_rank = "lora", lora_rank
    result, recs, wall = run_trainer(ctx, cfg, ctx.mc, gpu_like=True, skip_save=True)
    if not recs:
        raise RuntimeError("the trainer wrote no metrics record")
    steady = recs[1:] or recs

    def mean(key: str) -> float:
        vals = [float(r.get(key) or 0.0) for r in steady]
        return sum(vals) / len(vals)

    wait = mean("data_wait_fraction")
    out = {"tokens_per_pack": n_tokens, "steps": result.final_step, "windows": len(recs),
           "steady_windows": len(steady), "step_time_s": mean("step_time_s"),
           "tokens_per_step": mean("tokens_per_step"), "tokens_per_sec": mean("tokens_per_sec"),
           "actual_tflops": mean("actual_tflops"), "mfu": mean("mfu") if "mfu" in steady[-1] else None,
           "data_wait_fraction": wait, "data_wait_fraction_all_steps": result.data_wait_fraction,
           "peak_mem_mib": max(float(r.get("peak_mem_mib") or 0.0) for r in recs),
           "packing_efficiency": mean("packing_efficiency"), "final_ce": recs[-1].get("ce"),
           "final_mse": recs[-1].get("mse"), "wall_s": wall, "compiled_graphs": compiled_graphs() - graphs0,
           "records": recs}
    if out["mfu"] is not None:
        out["mfu_excluding_data_wait"] = out["mfu"] / max(1e-9, 1.0 - wait)
    if ctx.device.type == "cuda":
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(ctx.device) / 2**20
    finite = [h["loss"] for h in result.history if h.get("loss") is not None]
    if not finite or not all(math.isfinite(x) for x in finite):
        raise RuntimeError(f"non-finite loss in training: {finite[-3:]}")
    return out


# -- (e) inference -----------------------------------------------------------------------------------
def inference_row(ctx, new_tokens: int, image_side: int, timesteps: int) -> dict:
    """KV-cache greedy decoding tokens/s and one CFG image sample (BAGEL's text-to-image settings) on the
    row-b model (random weights, bf16 on CUDA / fp32 on CPU), through model.inference's Session."""
    from model.inference.image_sampler import SamplerParams
    from model.inference.interleave import Session
    from model.inference.text_generation import generate_text
    from model.unified import UnifiedModel

    dev = ctx.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with (torch.device(dev) if dev.type == "cuda" else contextlib.nullcontext()):
        model = UnifiedModel(ctx.mc)
    model = model.to(device=dev, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = ctx.tokenizer
    prompt = "Describe the findings of this frontal chest radiograph: lungs, heart, mediastinum, bones."
    # the end token is never chosen as a stop here, so every run decodes exactly new_tokens (random weights
    # would stop at an arbitrary point)
    no_stop = dataclasses.replace(tok.special, eos=-1)
    s = Session(model, tok, understanding_output=True, seed=0)
    s.add_text(prompt)
    generate_text(model, s.cond, no_stop, max_new_tokens=4)           # warm-up (kernels, allocator)
    sync(dev)
    t0 = time.perf_counter()
    gen = generate_text(model, s.cond, no_stop, max_new_tokens=new_tokens)
    sync(dev)
    dt = time.perf_counter() - t0
    out: dict[str, Any] = {"prompt_tokens": s.cond.kv_len, "new_tokens": len(gen.ids), "decode_s": dt,
                           "decode_tokens_per_sec": len(gen.ids) / dt if dt > 0 else 0.0,
                           "dtype": str(dtype).replace("torch.", "")}
    params = SamplerParams(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0),
                           cfg_renorm_type="global", cfg_renorm_min=0.0, num_timesteps=timesteps,
                           timestep_shift=3.0)
    g = Session(model, tok, understanding_output=False, seed=0)
    g.add_text("A frontal chest X-ray with a small left pleural effusion.")
    sync(dev)
    t0 = time.perf_counter()
    image, latent, (h, w) = g.generate_image(params, (image_side, image_side))
    sync(dev)
    out.update({"image_s": time.perf_counter() - t0, "image_size": [h, w], "timesteps": timesteps,
                "cfg": {"text_scale": 4.0, "img_scale": 1.0, "interval": [0.4, 1.0], "renorm": "global",
                        "shift": 3.0},
                "image_ok": image.size == (w, h) and bool(torch.isfinite(latent).all())})
    del model, s, g
    free_memory()
    return out


# -- (f) exact resume --------------------------------------------------------------------------------
def resume_row(ctx, mc, n_tokens: int, k: int, loaders: int) -> dict:
    """Straight k+2 steps (checkpoint at k) vs a run resumed from that checkpoint: the loss of step k+1 must
    be bit-identical (same weights, same pack from the restored stream state, same noise); step k+2 also
    needs the optimizer state restored and a deterministic backward."""
    from trainer.checkpoint import local as ck

    total = k + 2
    common = ["--deterministic", "True", "--save_every", str(k), "--max_checkpoints", "2",
              "--dataloader_workers", str(loaders)]
    a_cfg = ctx.train_config(n_tokens, ctx.work / "resume_a", steps=total, log_every=1, extra=common)
    straight, _, wall_a = run_trainer(ctx, a_cfg, mc, gpu_like=True, skip_save=False, quiet=True)
    source = a_cfg.checkpoint_dir / ck.step_dir_name(k)
    if not ck.is_complete(source):
        raise RuntimeError(f"no complete checkpoint at {source}")
    b_cfg = ctx.train_config(n_tokens, ctx.work / "resume_b", steps=total, log_every=1,
                             extra=common + ["--from_scratch", "False", "--resume_from", str(source)])
    resumed, _, wall_b = run_trainer(ctx, b_cfg, mc, gpu_like=True, skip_save=False, quiet=True)
    if resumed.start_step != k:
        raise RuntimeError(f"the resumed run started at step {resumed.start_step}, expected {k} "
                           f"({resumed.resumed_from})")

    def losses(h: dict) -> tuple:
        return h["ce"], h["mse"], h["loss"]

    a = {h["step"]: losses(h) for h in straight.history}
    b = {h["step"]: losses(h) for h in resumed.history}
    weights_equal = None
    try:
        from safetensors.torch import load_file

        wa = load_file(str(a_cfg.checkpoint_dir / ck.step_dir_name(total) / ck.MODEL_FILE))
        wb = load_file(str(b_cfg.checkpoint_dir / ck.step_dir_name(total) / ck.MODEL_FILE))
        weights_equal = wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    except Exception as exc:  # informational only
        weights_equal = f"not compared ({type(exc).__name__})"
    return {"k": k, "loaders": loaders, "tokens_per_pack": n_tokens, "resumed_from": resumed.resumed_from,
            "straight": {s: list(v) for s, v in a.items()}, "resumed": {s: list(v) for s, v in b.items()},
            "next_loss_equal": a.get(k + 1) == b.get(k + 1) and a.get(k + 1) is not None,
            "following_loss_equal": a.get(k + 2) == b.get(k + 2) and a.get(k + 2) is not None,
            "final_weights_equal": weights_equal, "wall_s": wall_a + wall_b}


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> Optional[float]:
    """bf16 n x n x n matrix products per second on this GPU: the reachable ceiling next to the MFU's peak."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = time.perf_counter() - t0
    del a, b
    free_memory()
    return 2 * n ** 3 * reps / dt / 1e12


def timed_row(row: Row, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        row.seconds = time.perf_counter() - t0
