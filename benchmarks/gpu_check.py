#!/usr/bin/env python
"""GPU check of the trainer's CUDA path on one GPU, in one command, in under 8 minutes on an H100.

    bash benchmarks/gpu_check.sh                  # the lent machine: sets PYTHONPATH, no install, no network
    python3 benchmarks/gpu_check.py --cpu_dry_run # every row's code path on CPU at tiny sizes (what CI runs)

Rows (benchmarks/README.md says what each means and the targets):
  a  attention backends on one real pack, bf16: SDPA with masks vs flex vs the varlen plan (vs flash-attn
     varlen when importable): time and max |difference| of outputs and gradients; at 8,192 and 32,768 tokens
  b  training steps of a 7B-width MoT slice (3,584 hidden, 28 heads, 4 KV heads, 18,944 intermediate, a few
     layers; ViT and VAE paths active) with FSDP2 + bf16 + activation checkpointing, at 8,192 and 32,768
     tokens per pack: step time, tokens/s, MFU (upstream's FLOP formula, the device's bf16 peak), peak memory
  c  the same with LoRA (rank 16 on every decoder Linear of both experts, peft, the trainer's LoRA path) at
     the largest pack: step time, tokens/s, peak memory next to row b's
  d  data-wait share of the row-b steps, fed by the real mixture stream in loader processes
  e  KV-cache greedy decoding tokens/s; one 512 px image sample with CFG, in seconds
  f  exact resume: stop after k steps, resume from the checkpoint, the next loss bit for bit

Prints a summary table at the end; writes everything as JSON to $OUT/gpu_check.json when OUT is set (and to
--json), rewritten after every row so a run cut short still leaves its finished rows. Exit code: 0 when no
row failed (a missed target is not a failure), 1 otherwise. Without a CUDA device (and no --cpu_dry_run) it
prints a line starting with "SKIP:" and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
MFU_TARGET = 0.40          # 7B-width model at 32,768 tokens per pack
DATA_WAIT_TARGET = 0.02
ROW_ORDER = ("a", "b", "c", "d", "e", "f")
# rough seconds a row needs on an H100 (compilation included); a row is skipped when less budget is left
LORA_RANK = 16
GPU_ROW_SECONDS = {"a": 40, "b": 60, "e": 30, "f": 60}


@dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    vit_layers: int            # ViT layers used (the config holds one more: vit_select_layer -2)
    vit_hidden: int
    vit_intermediate: int
    vit_heads: int
    vae_ch: int
    vae_mult: tuple
    vae_res_blocks: int
    vae_groups: int
    max_latent_size: int
    max_positions: int
    image_side: int
    words: tuple
    packs: tuple
    steps: dict
    log_every: dict
    loaders: int
    decode_tokens: int
    gen_side: int
    gen_timesteps: int
    resume_tokens: int
    resume_k: int
    resume_loaders: int
    resume_intermediate: int


def gpu_sizes(args) -> Sizes:
    layers = args.layers
    return Sizes(hidden=3584, heads=28, kv_heads=4, intermediate=18944, layers=layers,
                 # the same share of the 7B's 26 used ViT layers as of its 28 decoder layers
                 vit_layers=max(1, round(26 * layers / 28)), vit_hidden=1152, vit_intermediate=4304, vit_heads=16,
                 vae_ch=128, vae_mult=(1, 2, 4, 4), vae_res_blocks=2, vae_groups=32, max_latent_size=64,
                 max_positions=32768, image_side=512, words=(20, 120), packs=(8192, 32768),
                 steps={8192: 15, 32768: 12}, log_every={8192: 5, 32768: 4}, loaders=args.loaders,
                 decode_tokens=128, gen_side=512, gen_timesteps=50, resume_tokens=8192, resume_k=3,
                 resume_loaders=2, resume_intermediate=2048)


def dry_sizes(args) -> Sizes:
    return Sizes(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2, vit_layers=2, vit_hidden=64,
                 vit_intermediate=128, vit_heads=2, vae_ch=8, vae_mult=(1, 2, 2, 2), vae_res_blocks=1,
                 vae_groups=4, max_latent_size=32, max_positions=4096, image_side=128, words=(8, 30),
                 packs=(512, 1024), steps={512: 4, 1024: 4}, log_every={512: 2, 1024: 2}, loaders=2,
                 decode_tokens=8, gen_side=64, gen_timesteps=3, resume_tokens=512, resume_k=2, resume_loaders=2,
                 resume_intermediate=128)


@dataclass
class Context:
    """What the rows share: device, work folder, data, tokenizer and the model configs."""
    args: Any
    sizes: Sizes
    device: Any
    work: Path
    mixture: Path = None
    tokenizer: Any = None
    mc: Any = None                 # rows a, b, e: the 7B-width slice
    resume_mc: Any = None          # row f: one layer of the same attention geometry (small checkpoints)

    @property
    def dry(self) -> bool:
        return bool(self.args.cpu_dry_run)

    def train_config(self, n_tokens: int, storage: Path, *, steps: int, log_every: int, extra=()):
        from trainer.config import load_config, validate
        from trainer.data import generation_groups

        cuda = self.device.type == "cuda"
        argv = ["--config", str(self.mixture), "--from_scratch", "True", "--model", "tiny",
                "--use_gpu", str(cuda), "--parallelism", "fsdp", "--sharding_strategy", "FULL_SHARD",
                "--activation_checkpointing", "True", "--total_steps", str(steps),
                "--warmup_steps", str(min(2, steps)),
                "--lr", "1e-4", "--log_every", str(log_every), "--save_every", str(steps),
                "--max_checkpoints", "1", "--storage_path", str(storage), "--enable_tensorboard", "False",
                "--expected_num_tokens", str(n_tokens), "--max_num_tokens", str(n_tokens + n_tokens // 8),
                "--max_num_tokens_per_sample", str(min(n_tokens, 16384)),
                "--prefer_buffer_before", str(n_tokens // 2), "--dataloader_workers", str(self.sizes.loaders),
                "--prefetch_factor", "4",
                # CPU: a nominal 1 TFLOP/s peak, so the dry run computes an MFU figure at all
                "--peak_device_tflops", "0" if cuda else "1"]
        cfg = load_config(argv + list(extra))
        validate(cfg, generation_groups(str(self.mixture)))
        return cfg


def model_configs(ctx: Context, backend: str) -> None:
    from model.config import LLMConfig, ModelConfig, VAEConfig, ViTConfig

    z = ctx.sizes

    def llm(layers: int, intermediate: int) -> LLMConfig:
        return LLMConfig(vocab_size=ctx.tokenizer.vocab_size, hidden_size=z.hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=z.heads, num_key_value_heads=z.kv_heads,
                         max_position_embeddings=z.max_positions)

    vae = dict(ch=z.vae_ch, ch_mult=z.vae_mult, num_res_blocks=z.vae_res_blocks, norm_groups=z.vae_groups)
    ctx.mc = ModelConfig(llm=llm(z.layers, z.intermediate),
                         vit=ViTConfig(hidden_size=z.vit_hidden, intermediate_size=z.vit_intermediate,
                                       num_hidden_layers=z.vit_layers + 1, num_attention_heads=z.vit_heads),
                         vae=VAEConfig(**vae), max_latent_size=z.max_latent_size, attn_backend=backend)
    small_vit = ViTConfig(hidden_size=64 if ctx.dry else 384, intermediate_size=128 if ctx.dry else 1536,
                          num_hidden_layers=3, num_attention_heads=2 if ctx.dry else 6)
    small_vae = VAEConfig(ch=8 if ctx.dry else 32, ch_mult=(1, 2, 2, 2) if ctx.dry else (1, 2, 4, 4),
                          num_res_blocks=1, norm_groups=4 if ctx.dry else 8)
    ctx.resume_mc = ModelConfig(llm=llm(1, z.resume_intermediate), vit=small_vit, vae=small_vae,
                                max_latent_size=z.max_latent_size, attn_backend=backend)


def load_shard_factory():
    """tests/helpers/shard_factory.py (found wherever it lives under tests/), the synthetic shard writer."""
    import importlib.util

    candidates = [ROOT / "tests" / "helpers" / "shard_factory.py", *sorted((ROOT / "tests").rglob("shard_factory.py"))]
    for path in candidates:
        if path.is_file():
            spec = importlib.util.spec_from_file_location("medloom_shard_factory", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError("tests/helpers/shard_factory.py not found (the synthetic shard writer)")


def make_data(ctx: Context) -> None:
    from datasets_catalog.transforms import ImageTransformArgs

    sf = load_shard_factory()
    side = ctx.sizes.image_side
    vae_args = ImageTransformArgs(max_image_size=side, min_image_size=side // 2, image_stride=16)
    vit_side = side - side // 8
    vit_args = ImageTransformArgs(max_image_size=vit_side, min_image_size=vit_side // 2, image_stride=14,
                                  max_pixels=vit_side ** 2)
    catalog = sf.make_catalog(ctx.work / "data", [
        sf.DatasetRecipe("vqa", "sft", rows=256, distinct=32, image_sizes=(side // 2, side), words=ctx.sizes.words,
                         image_transform_args=vae_args, vit_image_transform_args=vit_args, seed=1),
        sf.DatasetRecipe("gen", "t2i", rows=256, distinct=32, image_sizes=(side // 2, side),
                         words=(max(4, ctx.sizes.words[0] // 2), ctx.sizes.words[1] // 3),
                         image_transform_args=vae_args, vit_image_transform_args=vit_args, seed=2),
    ])
    # both groups mandatory: every pack has ViT and VAE tokens, so every FSDP unit runs in every step
    ctx.mixture = sf.write_config(ctx.work / "mix.yaml", f"""
catalog: {catalog}
sft: {{dataset_names: [vqa], weight: 1, is_mandatory: true}}
t2i: {{dataset_names: [gen], weight: 1, is_mandatory: true}}
""")


# -- report ------------------------------------------------------------------------------------------
class Report:
    def __init__(self, paths: list[Path], env: dict) -> None:
        self.paths, self.env, self.rows = paths, env, []
        self.t0 = time.monotonic()

    def add(self, row) -> None:
        self.rows.append(row)
        line = f"[gpu_check] row {row.key}: {row.status}: {row.result}" + (f" | target {row.target}" if row.target else "")
        print(line, flush=True)
        self.write()

    def write(self) -> None:
        doc = {"format": "medloom-gpu-check-v1", "environment": self.env,
               "elapsed_s": time.monotonic() - self.t0, "rows": [asdict(r) for r in self.rows]}
        text = json.dumps(doc, indent=1, default=str)
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)

    def table(self) -> str:
        """One line per row: key, status, what it measures; the result (and target) indented below."""
        kw = max([3] + [len(r.key) for r in self.rows])
        sw = max([6] + [len(r.status) for r in self.rows])
        out = [f"{'row':<{kw}}  {'status':<{sw}}  measures / result", f"{'-' * kw}  {'-' * sw}  {'-' * 60}"]
        for r in self.rows:
            out.append(f"{r.key:<{kw}}  {r.status:<{sw}}  {r.what}")
            out.append(f"{'':<{kw}}  {'':<{sw}}    -> {r.result}" + (f"  [target: {r.target}]" if r.target else ""))
        return "\n".join(out)


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# -- rows --------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu_dry_run", action="store_true", help="every row on CPU at tiny sizes (fp32 attention; "
                    "training in bf16 autocast with FSDP2 over gloo, as on the GPU)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-width model (rows b, e)")
    ap.add_argument("--loaders", type=int, default=4, help="loader processes feeding the training steps")
    ap.add_argument("--rows", default=",".join(ROW_ORDER), help="rows to run, e.g. a,b,d")
    ap.add_argument("--budget_s", type=float, default=None,
                    help="wall-clock budget of the whole check (default 440 s on a GPU, none in the dry run); "
                         "rows that no longer fit are skipped")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()

    import torch

    cuda = torch.cuda.is_available()
    if not args.cpu_dry_run and not cuda:
        print(f"SKIP: no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); the GPU "
              f"check needs one GPU. The CPU dry run of the same rows: python3 benchmarks/gpu_check.py --cpu_dry_run")
        return 0
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import gpu_check_rows as R
    from datasets_catalog.tokenizer import TextTokenizer
    from model.attention import flash_attn_available
    from trainer.metrics import peak_tflops_from_name

    rows = {x.strip() for x in args.rows.split(",") if x.strip()}
    device = torch.device("cuda", 0) if not args.cpu_dry_run else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = dry_sizes(args) if args.cpu_dry_run else gpu_sizes(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(args=args, sizes=sizes, device=device, work=work)
    budget = args.budget_s if args.budget_s is not None else float("inf") if args.cpu_dry_run else 440.0
    try:
        import flash_attn  # noqa: F401

        fa = f"flash-attn {flash_attn.__version__}"
    except Exception:
        fa = "not importable"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    env = {"device": name, "dry_run": bool(args.cpu_dry_run), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "flash_attn": fa,
           "peak_bf16_tflops_for_mfu": peak_tflops_from_name(name) if device.type == "cuda" else 1.0,
           "sizes": asdict(sizes), "work": str(work), "budget_s": None if budget == float("inf") else budget,
           "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30
           if device.type == "cuda" else None}
    json_paths = [p for p in (args.json, Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
                  if p is not None] + [work / "gpu_check.json"]
    report = Report(json_paths, env)
    print(f"[gpu_check] device: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}; python "
          f"{platform.python_version()}; flash-attn: {fa}; work: {work}", flush=True)
    env["bf16_matmul_tflops_8192"] = R.matmul_tflops(device)
    if env["bf16_matmul_tflops_8192"]:
        print(f"[gpu_check] bf16 8192^3 matmul: {env['bf16_matmul_tflops_8192']:.0f} TFLOP/s "
              f"(MFU is against the {env['peak_bf16_tflops_for_mfu']:.0f} TFLOP/s dense bf16 peak)", flush=True)

    t0 = time.perf_counter()
    ctx.tokenizer = TextTokenizer.builtin()
    make_data(ctx)
    print(f"[gpu_check] synthetic shards ({sizes.image_side} px images) in {time.perf_counter() - t0:.1f}s", flush=True)
    model_configs(ctx, "sdpa")
    z = sizes
    width = (f"{z.layers} MoT layers at {z.hidden} hidden / {z.heads} heads / {z.kv_heads} KV heads / "
             f"{z.intermediate} intermediate, ViT {z.vit_layers} layers, VAE ch {z.vae_ch}")

    def left() -> float:
        return budget - (time.monotonic() - t_start)

    def run_row(row, key: str, fn, need: Optional[int] = None):
        """Run fn(row) unless the row is not selected or would not fit the budget; failures become results."""
        if key not in rows:
            row.status, row.result = "skipped", "not selected (--rows)"
            report.add(row)
            return None
        if need is not None and left() < need:
            row.status, row.result = "skipped", f"time budget: {left():.0f}s left, the row needs ~{need}s"
            report.add(row)
            return None
        try:
            value = R.timed_row(row, lambda: fn(row))
        except R.RowSkipped as exc:
            row.status, row.result = "n/a", str(exc)
            value = None
        except Exception as exc:
            traceback.print_exc()
            row.status = "FAIL"
            row.result = f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''}"
            row.details["traceback"] = traceback.format_exc()[-4000:]
            value = None
        R.free_memory()
        report.add(row)
        return value

    # (a) attention backends
    attention: dict[int, dict] = {}
    for n in sizes.packs:
        row = R.Row(f"a{n}", f"attention backends, {n}-token pack, {'fp32 (dry run)' if ctx.dry else 'bf16'}")

        def do_a(row, n=n):
            res = R.attention_row(ctx, n)
            row.details = res
            parts = []
            for b, e in res["backends"].items():
                if not e.get("ok"):
                    parts.append(f"{b} FAILED ({e['error'][:80]})")
                    continue
                t = f"{e['fwd_bwd_ms']:.1f}ms f+b" if "fwd_bwd_ms" in e else f"{e['fwd_ms']:.1f}ms fwd"
                d = "" if b == "sdpa" else f" max|d| {e['max_abs_vs_sdpa']:.1e}" + (
                    f" (grad {e['grad_max_abs_vs_sdpa']:.1e})" if "grad_max_abs_vs_sdpa" in e else "")
                first = f", first call {e['first_call_s']:.0f}s" if e.get("first_call_s", 0) >= 2 else ""
                parts.append(f"{b} {t}{d}{first}")
            if not res["backends"].get("flash"):
                parts.append("flash-attn not importable")
            row.result = "; ".join(parts) + f" ({res['tokens']} tokens, {res['samples']} samples)"
            bad = [b for b, e in res["backends"].items() if e.get("ok") and not e.get("agrees")]
            failed = [b for b, e in res["backends"].items() if not e.get("ok")]
            floor = res["backends"]["sdpa"].get("max_abs_vs_fp32", 0.0)
            row.target = ("outputs within 1e-4 of fp32 SDPA" if ctx.dry else
                          f"each backend within 2x bf16 SDPA's error vs fp32 ({floor:.1e}) + 1e-3")
            row.status = "FAIL" if bad or failed else "ok"
            return res

        res = run_row(row, "a", do_a, GPU_ROW_SECONDS["a"])
        if res:
            attention[n] = res

    # the training backend: what `auto` would pick on this device, if row a found it working
    def works(b: str) -> bool:
        return bool(attention) and all(r.get("backends", {}).get(b, {}).get("agrees") for r in attention.values())

    if ctx.dry:
        backend, why = "sdpa", "dry run: flex has no CPU backward"
    elif flash_attn_available() and (works("flash") or not attention):
        backend, why = "flash", "flash-attn varlen (auto's first choice)"
    elif works("flex") or not attention:
        backend, why = "flex", "flex attention, compiled (auto's choice without flash-attn)"
    else:
        backend, why = "sdpa", "SDPA with masks (flex failed or disagreed in row a)"
    model_configs(ctx, backend)
    env["training_attention"] = backend
    print(f"[gpu_check] training attention: {backend} ({why}); model: {width}", flush=True)

    # (b) training throughput, (d) data wait
    trained: dict[int, dict] = {}
    for n in sizes.packs:
        row = R.Row(f"b{n}", f"train {n} tok/pack: FSDP2+bf16+AC, {z.layers}L x {z.hidden} MoT, "
                             f"{ctx.mc.attn_backend}")

        def do_b(row, n=n):
            res = R.training_row(ctx, n, sizes.steps[n], sizes.log_every[n])
            res["attention"] = ctx.mc.attn_backend
            row.details = {k: v for k, v in res.items()}
            mfu = res.get("mfu")
            row.result = (f"{res['step_time_s']:.3f} s/step, {res['tokens_per_sec']:.0f} tok/s, MFU {pct(mfu)}"
                          f"{' (vs nominal 1 TFLOP/s)' if ctx.dry else ''}, {res['actual_tflops']:.1f} TFLOP/s, "
                          f"peak mem {res['peak_mem_mib'] / 1024:.1f} GiB, {res['steps']} steps"
                          + (f", {res['compiled_graphs']} graphs compiled" if res["compiled_graphs"] > 0 else ""))
            row.status = "ok"
            if n == max(sizes.packs):
                row.target = "MFU >= 40%"
                if not ctx.dry and mfu is not None:
                    met = mfu >= MFU_TARGET
                    row.target += " met" if met else " NOT met"
                    row.status = "ok" if met else "not met"
                elif ctx.dry:
                    row.target += " (not judged in the dry run)"
            return res

        res = run_row(row, "b", do_b, GPU_ROW_SECONDS["b"])
        if res:
            trained[n] = res
        elif row.status == "FAIL" and ctx.mc.attn_backend != "sdpa":
            model_configs(ctx, "sdpa")    # keep measuring: the remaining rows fall back to SDPA with masks
            env["training_attention"] = f"sdpa (after {backend} failed in row {row.key})"
            print(f"[gpu_check] {backend} failed in training; the remaining rows use sdpa", flush=True)

    # (c) LoRA
    row = R.Row("c", f"train with LoRA r{LORA_RANK} (as row b, largest pack)")

    def do_c(row):
        n = max(sizes.packs)
        res = R.training_row(ctx, n, sizes.steps[n], sizes.log_every[n], lora_rank=LORA_RANK)
        row.details = dict(res)
        full = trained.get(n)
        vs = (f" (full fine-tuning: {full['step_time_s']:.3f} s/step, {full['peak_mem_mib'] / 1024:.1f} GiB)"
              if full else "")
        row.result = (f"{n} tok/pack, rank {LORA_RANK}: {res['step_time_s']:.3f} s/step, "
                      f"{res['tokens_per_sec']:.0f} tok/s, peak mem {res['peak_mem_mib'] / 1024:.1f} GiB{vs}")
        row.status = "ok"
        return res

    run_row(row, "c", do_c, GPU_ROW_SECONDS["b"])

    row = R.Row("d", "data-wait share of row-b steps (mixture stream, loader processes)")

    def do_d(row):
        if not trained:
            raise R.RowSkipped("no row-b run finished")
        parts = [f"{n} tok: {pct(r['data_wait_fraction'])}" for n, r in sorted(trained.items())]
        row.details = {str(n): {"data_wait_fraction": r["data_wait_fraction"],
                                "all_steps": r["data_wait_fraction_all_steps"]} for n, r in trained.items()}
        row.result = "; ".join(parts) + f" of step time ({sizes.loaders} loader processes, steady windows)"
        worst = max(r["data_wait_fraction"] for r in trained.values())
        row.target = "< 2%"
        if ctx.dry:
            row.target += " (not judged in the dry run)"
            row.status = "ok"
        else:
            row.status = "ok" if worst < DATA_WAIT_TARGET else "not met"
            row.target += " met" if worst < DATA_WAIT_TARGET else " NOT met"

    run_row(row, "d", do_d)

    # (e) inference
    row = R.Row("e", f"KV-cache greedy decode; one {z.gen_side} px CFG image, {z.layers}L model")

    def do_e(row):
        res = R.inference_row(ctx, z.decode_tokens, z.gen_side, z.gen_timesteps)
        row.details = res
        row.result = (f"{res['decode_tokens_per_sec']:.1f} tok/s ({res['new_tokens']} tokens after "
                      f"{res['prompt_tokens']}); image {res['image_size'][0]}x{res['image_size'][1]}, "
                      f"{res['timesteps']} steps, CFG 4.0 on (0.4, 1]: {res['image_s']:.2f} s")
        row.status = "ok" if res["image_ok"] and res["new_tokens"] == z.decode_tokens else "FAIL"
        return res

    run_row(row, "e", do_e, GPU_ROW_SECONDS["e"])

    # (f) exact resume
    row = R.Row("f", f"exact resume: stop after k steps, resume, next loss bit for bit")

    def do_f(row):
        res = R.resume_row(ctx, ctx.resume_mc, z.resume_tokens, z.resume_k, z.resume_loaders)
        row.details = res
        k = res["k"]
        row.result = (f"k={k}, {res['loaders']} loaders, 1-layer {z.hidden}-wide model: step {k + 1} loss "
                      f"{'identical' if res['next_loss_equal'] else 'DIFFERS'}; step {k + 2} "
                      f"{'identical' if res['following_loss_equal'] else 'differs'}; final weights "
                      f"{'identical' if res['final_weights_equal'] is True else 'differ'}")
        row.target = "step k+1 loss bit-identical"
        row.status = "ok" if res["next_loss_equal"] else "FAIL"
        return res

    run_row(row, "f", do_f, GPU_ROW_SECONDS["f"])

    report.env["wall_s"] = time.monotonic() - t_start
    report.write()
    print("\n" + report.table())
    failed = [r.key for r in report.rows if r.status == "FAIL"]
    big = trained.get(max(sizes.packs), {})
    headline = (f"mfu@{max(sizes.packs)}={pct(big.get('mfu'))} tok/s@{max(sizes.packs)}="
                f"{big.get('tokens_per_sec', 0):.0f} " if big else "")
    if trained:
        headline += f"data_wait={pct(max(r['data_wait_fraction'] for r in trained.values()))} "
    print(f"\nRESULT device={name!r} rows={len(report.rows)} failed={','.join(failed) or 'none'} {headline}"
          f"attention={env['training_attention']} wall={report.env['wall_s']:.0f}s json={json_paths[0]}"
          + ("" if device.type == "cuda" else " (CPU dry run: not measured on a GPU)"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
