#!/usr/bin/env python
"""Batched vs one-at-a-time greedy decoding of jobs/evaluate.py on the shipped text VQA records.

    python benchmarks/eval_decode_bench.py --model_path CK [--batch_size 8] [--max_new_tokens 64]

Both paths run in one process after a warm-up pass, over the same records (ct_mr_vqa and radiology_text_qa
from examples/radiology/annotations, repeated --repeat times): one at a time = `VQAInferencer.chat` (greedy)
per record; batched = `prepare` per record, then `answer_batch` over --batch_size sessions. Both times include
the prompt (prefill) work. Prints samples/s of both, the speed-up, and whether every answer is identical.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from model.evaluation.sources import from_jsonl
from model.inference.api import VQAInferencer
from model.inference.jobs_io import parse_transform

ANNOTATIONS = ROOT / "examples" / "radiology" / "annotations"
IMAGES = ROOT / "examples" / "radiology" / "images"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="records are repeated this many times (default 2)")
    p.add_argument("--vit_transform", default="56,28,14,3136")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    items = [it for name in ("ct_mr_vqa", "radiology_text_qa")
             for it in from_jsonl(ANNOTATIONS / f"{name}.jsonl", IMAGES) if it.error is None] * args.repeat
    inf = VQAInferencer(args.model_path, vit_transform=parse_transform(args.vit_transform, "--vit_transform"))
    images = [[s.load() for s in it.images] for it in items]

    def one_at_a_time() -> list[str]:
        return [inf.chat(im, it.messages, max_new_tokens=args.max_new_tokens, do_sample=False)
                for im, it in zip(images, items)]

    def batched() -> list[str]:
        out = []
        for i in range(0, len(items), args.batch_size):
            sessions = [inf.prepare(im, it.messages) for im, it in
                        zip(images[i:i + args.batch_size], items[i:i + args.batch_size])]
            out += inf.answer_batch(sessions, max_new_tokens=args.max_new_tokens)
        return out

    batched(), one_at_a_time()   # warm-up
    t0 = time.perf_counter()
    seq = one_at_a_time()
    t1 = time.perf_counter()
    bat = batched()
    t2 = time.perf_counter()
    res = {"records": len(items), "device": str(inf.device), "batch_size": args.batch_size,
           "max_new_tokens": args.max_new_tokens, "one_at_a_time_samples_per_s": len(items) / (t1 - t0),
           "batched_samples_per_s": len(items) / (t2 - t1), "speedup": (t1 - t0) / (t2 - t1),
           "identical_answers": seq == bat}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['records']} records on {res['device']}, max_new_tokens {args.max_new_tokens}: one at a time "
              f"{res['one_at_a_time_samples_per_s']:.2f} samples/s, batched ({args.batch_size}) "
              f"{res['batched_samples_per_s']:.2f} samples/s, speed-up {res['speedup']:.2f}x, identical answers: "
              f"{res['identical_answers']}")
    return 0 if res["identical_answers"] else 1


if __name__ == "__main__":
    sys.exit(main())
