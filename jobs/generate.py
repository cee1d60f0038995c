#!/usr/bin/env python
"""Image generation and editing with a trained checkpoint (docs/upstream-compat.md#image-generation, UniMedVL's editing example).

    python jobs/generate.py --model_path CKPT_DIR --image he.png --instruction "Synthesise the IHC stain." --out ihc.png
    python jobs/generate.py --model_path CKPT_DIR --instruction "A fundus photograph." --out fundus.png   # text-to-image
    python jobs/generate.py --model_path CKPT_DIR --input edits.jsonl --output generated.jsonl

Editing runs an understanding pass first and appends its text to the instruction (UniMedVL default;
--understanding turn|none changes that, --think reasons in think mode instead). The VAE / ViT transforms default
to those the checkpoint was trained at (its training_args.json). CUDA is used when present (bf16), else
the CPU (fp32). Exit status 2 for a user mistake (one message, no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs import add_model_group, prog
from model.inference.image_sampler import RENORM_TYPES
from model.inference.interleave import UMV_GEN_VAE_ARGS, UMV_GEN_VIT_ARGS
from model.inference.jobs_io import exit_status, format_transform, parse_transform, wants_batch, save_latent, save_png
from model.inference.loading import InferenceError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("jobs/generate.py"),
        description="Generate or edit a medical image with a checkpoint (one instruction, or a JSONL batch).",
        epilog='Example: python jobs/generate.py --model_path runs/mix/checkpoints/0000200 --image '
               'examples/radiology/images/pathology/he_tile0.png --instruction "Translate this H&E tile into '
               'the matching IHC stain." --out ihc.png')
    p.add_argument("--model_path", required=True, help="checkpoint directory (llm_config.json, vit_config.json, "
                                                       "ema.safetensors, ae.safetensors, tokenizer files)")
    single = p.add_argument_group("single instruction")
    single.add_argument("--image", help="input image to edit (omit for text-to-image)")
    single.add_argument("--instruction", help="what to generate or how to edit the image")
    single.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (default %(default)s)")
    single.add_argument("--save_latent", type=Path, help="also write the sampled latent tokens (safetensors)")
    single.add_argument("--size", help="HEIGHTxWIDTH of the output, multiples of 16 (default: text-to-image 1024x1024, "
                                       "edits the input's size under the VAE resize rule)")
    batch = p.add_argument_group("batch (evaluation)")
    batch.add_argument("--input", type=Path, help="JSONL records (input_img, message): input_img[0] and the last "
                                                  "human turn (without <image> tags) are the instruction")
    batch.add_argument("--output", type=Path, help="JSONL written with output_img pointing at the generated PNGs")
    batch.add_argument("--data_dir", type=Path, help="folder input image paths are relative to (default: the "
                                                     "input's folder)")
    batch.add_argument("--keep_image_tags", action="store_true",
                       help="use the human turn verbatim, <image> tags included (as edit training records saw it)")
    batch.add_argument("--image_dir", type=Path, help="where generated PNGs go (default: OUTPUT_images/)")
    g = p.add_argument_group("sampling (UniMedVL editing defaults)")
    g.add_argument("--cfg_text_scale", type=float, default=4.0, help="text CFG scale (default 4.0; <= 1 turns all "
                                                                     "guidance off, upstream quirk)")
    g.add_argument("--cfg_img_scale", type=float, default=2.0, help="image CFG scale (default 2.0)")
    g.add_argument("--cfg_interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"),
                   help="CFG applies for t in (LO, HI] (default 0 1)")
    g.add_argument("--cfg_renorm_type", choices=RENORM_TYPES, default="text_channel", help="default %(default)s")
    g.add_argument("--cfg_renorm_min", type=float, default=0.0, help="default 0.0")
    g.add_argument("--num_timesteps", type=int, default=50, help="default 50")
    g.add_argument("--timestep_shift", type=float, default=3.0, help="default 3.0")
    g.add_argument("--seed", type=int, default=42, help="seed of the noise and text draws (default 42)")
    g.add_argument("--think", action="store_true", help="thinking mode: analyse first, the thought is printed")
    g.add_argument("--understanding", choices=("append", "turn", "none"), default="append",
                   help="edits: 'append' the understanding text to the instruction (UniMedVL example, default), "
                        "add it as its own 'turn' before the image (the layout of edit training records), or "
                        "'none'")
    g.add_argument("--text_sample", action="store_true", help="sample the understanding/think text (default greedy)")
    g.add_argument("--text_temperature", type=float, default=0.3, help="default 0.3")
    g.add_argument("--max_think_tokens", type=int, default=800, help="default 800")
    m = add_model_group(p)
    m.add_argument("--vae_transform",
                   help="VAE resize MAX,MIN,STRIDE[,MAX_PIXELS] (default: the one the checkpoint's training_args.json "
                        f"records; a released directory: UniMedVL inference {format_transform(UMV_GEN_VAE_ARGS)})")
    m.add_argument("--vit_transform",
                   help="ViT resize MAX,MIN,STRIDE[,MAX_PIXELS] (default: the one the checkpoint's training_args.json "
                        f"records; a released directory: UniMedVL inference {format_transform(UMV_GEN_VIT_ARGS)})")
    m.add_argument("--json", action="store_true", help="single mode: print a JSON summary")
    return p.parse_args(argv)


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InferenceError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 512x512") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 with one `error:` line for a user mistake (never a traceback), 130 when interrupted."""
    return exit_status(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    batch_mode = wants_batch(args.input, args.output)
    if not batch_mode and not args.instruction:
        raise InferenceError("give --instruction (and --image to edit) for one image, or --input/--output for a batch")
    if batch_mode and not args.input.is_file():
        raise InferenceError(f"--input {args.input}: no such file")
    vae = parse_transform(args.vae_transform, "--vae_transform") if args.vae_transform else None
    vit = parse_transform(args.vit_transform, "--vit_transform") if args.vit_transform else None
    size = _size(args.size)

    from model.inference.api import ImageGenerator, open_image

    image = open_image(args.image) if (args.image and not batch_mode) else None   # fail before loading the model
    gen = ImageGenerator(args.model_path, device=args.device, dtype=args.dtype, use_ema=not args.use_model_weights,
                         vae_transform=vae, vit_transform=vit)
    options = dict(cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale,
                   cfg_interval=tuple(args.cfg_interval), cfg_renorm_type=args.cfg_renorm_type,
                   cfg_renorm_min=args.cfg_renorm_min, num_timesteps=args.num_timesteps,
                   timestep_shift=args.timestep_shift, seed=args.seed, use_thinking=args.think,
                   understanding=args.understanding, text_do_sample=args.text_sample,
                   text_temperature=args.text_temperature, max_think_token_n=args.max_think_tokens,
                   image_shape=size)
    if batch_mode:
        from model.inference.batch import generate_handler, run_batch

        data_dir = args.data_dir or args.input.resolve().parent
        image_dir = args.image_dir or args.output.with_name(args.output.stem + "_images")
        summary = run_batch(args.input, args.output, data_dir, generate_handler(gen, image_dir, args.keep_image_tags, **options),
                            "generate")
        print(summary.line("generate") + f"; wrote {args.output}, images in {image_dir} (use it as data_dir)")
        for err in summary.errors:
            print(f"  {err}")
        return 1 if summary.failed else 0
    result = gen.infer_single(image, args.instruction, **options)
    save_png(result.image, args.out)
    if args.save_latent:
        save_latent(result.latent, result.height, result.width, args.save_latent)
    if args.json:
        print(json.dumps({"out": str(args.out), "height": result.height, "width": result.width,
                          "thought": result.thought, "understanding": result.understanding,
                          "instruction": result.instruction}, ensure_ascii=False))
    else:
        if result.thought and result.thought.strip():            # only when there is text
            print(f"thought: {result.thought}")
        if result.understanding and result.understanding.strip():
            print(f"understanding: {result.understanding}")
        print(f"wrote {args.out} ({result.width}x{result.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
