#!/usr/bin/env python
"""GPU path check: a few training steps of a mid-size model on one CUDA device through the real trainer loop
(FSDP2 with bf16 mixed precision, activation checkpointing, flash-attn varlen when installed, else flex
attention), on synthetic shards streamed by the real mixture stream. Prints tokens/s and MFU per log window.

    python benchmarks/gpu_check.py              # ~1-3 minutes on one H100
    python benchmarks/gpu_check.py --steps 30 --layers 12 --hidden 1536

Skips with exit code 0 and a clear message when no CUDA device exists.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--tokens", type=int, default=8192, help="expected_num_tokens per packed batch")
    ap.add_argument("--no_ac", action="store_true", help="disable activation checkpointing")
    ap.add_argument("--loaders", type=int, default=4, help="background loader processes (stream slots)")
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--cpu_dry_run", action="store_true",
                    help="exercise this script on CPU (FSDP2 over gloo, fp32, small sizes) without a GPU")
    args = ap.parse_args()

    import torch

    if args.cpu_dry_run:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 64, 2, 4, 2, 128
        args.tokens, args.steps, args.loaders = min(args.tokens, 1024), min(args.steps, 6), 2
    elif not torch.cuda.is_available():
        print("SKIP: no CUDA device visible (torch.cuda.is_available() is False); the GPU check needs one GPU. "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}.")
        return 0
    dev = torch.cuda.get_device_name(0) if not args.cpu_dry_run else "cpu (dry run)"
    try:
        import flash_attn  # noqa: F401

        fa = f"flash-attn {flash_attn.__version__}"
    except Exception:
        fa = "flash-attn NOT installed (flex attention used instead)"
    print(f"device: {dev}; torch {torch.__version__}; CUDA {torch.version.cuda}; {fa}", flush=True)

    from datasets_catalog.tokenizer import TextTokenizer
    from datasets_catalog.transforms import ImageTransformArgs
    from model.attention import choose_backend
    from model.config import LLMConfig, ModelConfig, VAEConfig, ViTConfig
    from model.unified import UnifiedModel
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))        # tests.shard_factory (tests/ is not an installed package)
    from tests.shard_factory import DatasetRecipe, make_catalog, write_config
    from trainer.config import load_config, validate
    from trainer.data import generation_groups
    from trainer.loop import train_loop
    from trainer.metrics import dense_params_for_flops

    work = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    side = 128 if args.cpu_dry_run else 512
    vae_args = ImageTransformArgs(max_image_size=side, min_image_size=side // 2, image_stride=16)
    vit_args = ImageTransformArgs(max_image_size=side - side // 8, min_image_size=side // 2 - side // 16,
                                  image_stride=14, max_pixels=(side - side // 8) ** 2)
    t0 = time.time()
    catalog = make_catalog(work / "data", [
        DatasetRecipe("vqa", "sft", rows=256, distinct=32, image_sizes=(side // 2, side), words=(20, 120),
                      image_transform_args=vae_args, vit_image_transform_args=vit_args, seed=1),
        DatasetRecipe("gen", "t2i", rows=256, distinct=32, image_sizes=(side // 2, side), words=(10, 40),
                      image_transform_args=vae_args, vit_image_transform_args=vit_args, seed=2),
    ])
    # both groups mandatory: every pack has ViT and VAE tokens, so every FSDP unit runs in every step
    mix = write_config(work / "mix.yaml", f"""
catalog: {catalog}
sft: {{dataset_names: [vqa], weight: 1, is_mandatory: true}}
t2i: {{dataset_names: [gen], weight: 1, is_mandatory: true}}
""")
    print(f"synthetic shards in {time.time() - t0:.1f}s at {work}", flush=True)

    tok = TextTokenizer.builtin()
    mc = ModelConfig(
        llm=LLMConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=32768),
        vit=ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=7, num_attention_heads=6),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8),
        max_latent_size=64, attn_backend="auto",
    )

    def builder(cfg):
        model = UnifiedModel(mc)
        model.init_moe()
        return model, mc, tok

    # the backend the model will pick (the dry run on CPU gets SDPA, not flex)
    attention = choose_backend(mc.attn_backend, torch.device("cpu" if args.cpu_dry_run else "cuda"))
    n_tok = args.tokens
    argv = ["--config", str(mix), "--from_scratch", "True", "--model", "tiny", "--use_gpu", str(not args.cpu_dry_run),
            "--parallelism", "fsdp",
            "--total_steps", str(args.steps), "--warmup_steps", "2", "--lr", "1e-4", "--log_every", "5",
            "--save_every", str(args.steps), "--max_checkpoints", "1", "--storage_path", str(work / "runs"),
            "--expected_num_tokens", str(n_tok), "--max_num_tokens", str(n_tok + 2048),
            "--max_num_tokens_per_sample", str(n_tok), "--prefer_buffer_before", str(n_tok // 2),
            "--dataloader_workers", str(args.loaders), "--prefetch_factor", "4", "--torch_threads", "4",
            "--activation_checkpointing", str(not args.no_ac), "--sharding_strategy", "FULL_SHARD"]
    cfg = load_config(argv)
    validate(cfg, generation_groups(cfg.mixture_path))
    print(f"model: LLM hidden {args.hidden}, {args.layers} layers (MoT), dense params for MFU "
          f"{dense_params_for_flops(mc.llm) / 1e6:.0f}M; packs of ~{n_tok} tokens; {args.steps} steps", flush=True)
    t1 = time.time()
    result = train_loop(cfg, model_builder=builder)
    wall = time.time() - t1
    recs = [json.loads(line) for line in (cfg.results_dir / "metrics.jsonl").read_text().splitlines()]
    print("\nstep  ce      mse     tokens/s   MFU     MFU(compute)  data-wait  s/step  peak-mem")
    for r in recs:
        busy = max(1e-9, 1.0 - r["data_wait_fraction"])
        print(f"{r['step']:>4}  {r.get('ce') or 0:6.3f}  {r.get('mse') or 0:6.3f}  {r['tokens_per_sec']:9.0f}  "
              f"{100 * r.get('mfu', 0):5.1f}%  {100 * r.get('mfu', 0) / busy:8.1f}%     "
              f"{100 * r['data_wait_fraction']:6.1f}%  {r['step_time_s']:6.3f}  {r['peak_mem_mib']:.0f} MiB")
    steady = recs[1:] or recs
    tps = sum(r["tokens_per_sec"] for r in steady) / len(steady)
    mfu = sum(r.get("mfu", 0.0) for r in steady) / len(steady)
    wait = sum(r["data_wait_fraction"] for r in steady) / len(steady)
    print(f"\nRESULT device={dev!r} tokens_per_sec={tps:.0f} mfu={100 * mfu:.1f}% "
          f"mfu_excluding_data_wait={100 * mfu / max(1e-9, 1 - wait):.1f}% data_wait={100 * wait:.1f}% "
          f"(steady windows, excluding the first) steps={result.final_step} wall={wall:.0f}s "
          f"attention={attention} checkpoint={result.checkpoints[-1:]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
