#!/usr/bin/env python
"""Visual question answering / report writing with a trained checkpoint (docs/upstream-compat.md#text-generation).

    python jobs/vqa.py --model_path CKPT_DIR --image X.png --prompt "Describe this chest X-ray."
    python jobs/vqa.py --model_path CKPT_DIR --input eval.jsonl --output answers.jsonl [--data_dir DIR]

CKPT_DIR is any checkpoint directory the trainer writes (checkpoints/0000200/) or a released UniMedVL /
BAGEL directory. The ViT transform defaults to the one the checkpoint was trained at (its
training_args.json). CUDA is used when present (bf16), else the CPU (fp32). Exit status 2 for a user mistake
(one message, no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs import add_model_group, prog
from model.inference.interleave import VQA_VIT_ARGS
from model.inference.jobs_io import exit_status, format_transform, parse_transform, wants_batch
from model.inference.loading import InferenceError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("jobs/vqa.py"),
        description="Answer a question about a medical image (or a batch of JSONL records) with a checkpoint.",
        epilog='Example: python jobs/vqa.py --model_path runs/mix/checkpoints/0000200 '
               '--image examples/radiology/images/ct/ct_small_bone.png --prompt "Describe the vertebral body."')
    p.add_argument("--model_path", required=True, help="checkpoint directory (llm_config.json, vit_config.json, "
                                                       "ema.safetensors, tokenizer files)")
    single = p.add_argument_group("single question")
    single.add_argument("--image", action="append", default=[], help="image file (PNG/JPEG/DICOM/NIfTI); repeat "
                                                                     "for several images")
    single.add_argument("--prompt", help="the question; <image> tags place the images, else they come first")
    batch = p.add_argument_group("batch (evaluation)")
    batch.add_argument("--input", type=Path, help="JSONL records (input_img, message): the last human turn is "
                                                  "answered, earlier turns are context")
    batch.add_argument("--output", type=Path, help="JSONL written with the answer as the last gpt message and "
                                                   "the record's own answer under 'reference'")
    batch.add_argument("--data_dir", type=Path, help="folder image paths are relative to (default: the input's folder)")
    g = p.add_argument_group("decoding (UniMedVL VQA defaults)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--max_new_tokens", type=int, default=512, help="stop after this many tokens (default 512)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling (do_sample=False)")
    g.add_argument("--seed", type=int, default=42, help="seed of the sampling draws (default 42)")
    g.add_argument("--think", action="store_true", help="reason in <think> ... </think> before answering")
    m = add_model_group(p)
    m.add_argument("--vit_transform",
                   help="ViT resize MAX,MIN,STRIDE[,MAX_PIXELS] (default: the one the checkpoint's "
                        "training_args.json records; a released directory: vlm_sft "
                        f"{format_transform(VQA_VIT_ARGS)})")
    m.add_argument("--json", action="store_true", help="single mode: print {\"answer\": ...} as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 with one `error:` line for a user mistake (never a traceback), 130 when interrupted."""
    return exit_status(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    batch_mode = wants_batch(args.input, args.output)
    if not batch_mode and args.prompt is None:
        raise InferenceError("give --prompt (with --image) for one question, or --input/--output for a batch")
    if args.max_new_tokens < 1:
        raise InferenceError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not args.greedy and args.temperature <= 0:
        raise InferenceError(f"--temperature must be > 0 when sampling, got {args.temperature} (or pass --greedy)")
    vit = parse_transform(args.vit_transform, "--vit_transform") if args.vit_transform else None
    if batch_mode and not args.input.is_file():
        raise InferenceError(f"--input {args.input}: no such file")

    from model.inference.api import VQAInferencer, open_image

    images = [open_image(i) for i in args.image] if not batch_mode else []   # fail before loading the model
    inf = VQAInferencer(args.model_path, device=args.device, dtype=args.dtype,
                        use_ema=not args.use_model_weights, vit_transform=vit)
    options = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                   seed=args.seed, think=args.think)
    if batch_mode:
        from model.inference.batch import run_batch, vqa_handler

        data_dir = args.data_dir or args.input.resolve().parent
        summary = run_batch(args.input, args.output, data_dir, vqa_handler(inf, **options), "vqa")
        print(summary.line("vqa") + f"; wrote {args.output}")
        for err in summary.errors:
            print(f"  {err}")
        return 1 if summary.failed else 0
    answer = inf.infer_single(images or None, args.prompt, **options)
    print(json.dumps({"answer": answer}, ensure_ascii=False) if args.json else answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
