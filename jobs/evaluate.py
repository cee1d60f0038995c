#!/usr/bin/env python
"""Score a checkpoint on medical VQA, report and image-generation sets (predictions, metrics, HTML report).

    python jobs/evaluate.py --model_path CK --shards shards --datasets ct_mr_vqa --out eval/ck
    python jobs/evaluate.py --model_path CK --catalog catalog/radiology.yaml --datasets ct_mr_vqa --out eval/ck
    python jobs/evaluate.py --model_path CK --input records.jsonl --data_dir DIR --out eval/ck
    python jobs/evaluate.py --predictions other_model.jsonl --out eval/other       # score only, no model
    python jobs/evaluate.py --compare eval/a/metrics.json eval/b/metrics.json

Scoring rules (closed yes/no accuracy, open-answer token recall, BLEU-4 / ROUGE-L for reports, PSNR / SSIM
for images): docs/evaluation.md. Exit status 2 with one `error:` line for a user mistake.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs import add_model_group, prog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("jobs/evaluate.py"),
        description="Evaluate a checkpoint (or score an existing predictions file): writes predictions.jsonl, "
                    "metrics.json and report.html into --out; a rerun into the same --out resumes.",
        epilog="Scoring rules: docs/evaluation.md. Example: python jobs/evaluate.py --model_path "
               "runs/x/checkpoints/0000200 --shards shards --datasets ct_mr_vqa --out eval/x")
    src = p.add_argument_group("what to evaluate (one of)")
    src.add_argument("--model_path", help="checkpoint directory (the trainer's, or a released UniMedVL / BAGEL one)")
    src.add_argument("--shards", type=Path, help="folder of ingested shards (shards/<dataset>/) with --datasets")
    src.add_argument("--catalog", type=Path, help="catalog YAML whose ingested datasets to read, with --datasets")
    src.add_argument("--datasets", help="comma-separated dataset names (with --shards or --catalog)")
    src.add_argument("--input", type=Path, help="JSONL records in the catalog format (input_img, message, output_img)")
    src.add_argument("--data_dir", type=Path, help="folder --input image paths are relative to (default: its folder)")
    src.add_argument("--predictions", type=Path, help="score this predictions JSONL (dataset, reference, "
                                                      "prediction per line) without a model")
    src.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="print per-dataset deltas B - A of "
                                                                               "two metrics.json files")
    p.add_argument("--out", type=Path, help="output folder (predictions.jsonl, metrics.json, report.html, images/)")
    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=512, help="answer length cap (default 512); greedy decoding")
    g.add_argument("--batch_size", type=int, default=8, help="text records decoded together through the KV cache "
                                                             "(default 8; 1 = one at a time)")
    g.add_argument("--vit_transform", help="ViT resize MAX,MIN,STRIDE[,MAX_PIXELS] (default: each dataset's own "
                                           "from its shards' manifest; --input: the checkpoint's recorded one)")
    g.add_argument("--vae_transform", help="VAE resize MAX,MIN,STRIDE[,MAX_PIXELS] for image records (default: the "
                                           "dataset's own)")
    g.add_argument("--num_timesteps", type=int, default=50, help="flow steps of image records (default 50)")
    g.add_argument("--cfg_text_scale", type=float, default=4.0)
    g.add_argument("--cfg_img_scale", type=float, default=2.0)
    g.add_argument("--understanding", choices=("append", "turn", "none"), default="append",
                   help="edit records: as jobs/generate.py (default append, UniMedVL's example)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--fid_weights", type=Path, help="local Inception weights file for FID (not computed in this version: a note says so)")
    add_model_group(p)
    p.add_argument("--json", action="store_true", help="print metrics.json (or the comparison) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


class UserError(ValueError):
    pass


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 or i == 1 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def summary_rows(metrics: dict) -> list[list[str]]:
    from model.evaluation.html_report import HEADLINE

    rows = []
    for name, d in metrics.get("datasets", {}).items():
        for kind, metric in HEADLINE.items():
            if kind in d:
                extra = f" (exact {d[kind]['exact_match']:.3f})" if kind == "open" else (
                    f" (bleu4 {d[kind]['bleu4']:.3f})" if kind == "report" else (
                        f" (psnr {d[kind]['psnr']:.2f})" if kind == "image" else ""))
                rows.append([name, kind, str(d[kind]["n"]), f"{metric} {d[kind][metric]:.3f}{extra}"])
        if d.get("errors"):
            rows.append([name, "errors", str(d["errors"]), "see predictions.jsonl"])
    return rows


def _load_metrics(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"--compare {path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--compare {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict):
        raise UserError(f"--compare {path}: field 'datasets' is missing: not a metrics.json of jobs/evaluate.py")
    return data


def _items(args: argparse.Namespace):
    from model.evaluation import sources

    if args.input is not None:
        return sources.from_jsonl(args.input, args.data_dir or args.input.resolve().parent)
    names = [n.strip() for n in (args.datasets or "").split(",") if n.strip()]
    if not names:
        raise UserError("--datasets A,B is needed with --shards or --catalog")
    if args.shards is not None:
        if not args.shards.is_dir():
            raise UserError(f"--shards {args.shards}: no such folder")
        return sources.from_shards(args.shards, names)
    if not args.catalog.is_file():
        raise UserError(f"--catalog {args.catalog}: no such file")
    return sources.from_catalog(args.catalog, names)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.compare:
        from model.evaluation.runner import compare

        a, b = (_load_metrics(p) for p in args.compare)
        rows = compare(a, b)
        if args.json:
            print(json.dumps([dict(zip(["dataset", "metric", "a", "b", "delta"], r)) for r in rows], indent=2))
        else:
            print(_table(rows, ["dataset", "metric", "A", "B", "B - A"]) if rows else "no metric in common")
        return 0
    if args.out is None:
        raise UserError("--out DIR is needed (predictions.jsonl, metrics.json and report.html go there)")
    if args.predictions is not None:
        from model.evaluation.runner import score_predictions

        metrics = score_predictions(args.predictions, args.out)
    else:
        given = [f for f in ("shards", "catalog", "input") if getattr(args, f) is not None]
        if args.model_path is None or len(given) != 1:
            raise UserError("give --model_path with exactly one of --shards, --catalog or --input "
                            "(or --predictions FILE alone, or --compare A B)")
        if args.max_new_tokens < 1 or args.batch_size < 1:
            raise UserError("--max_new_tokens and --batch_size must be >= 1")
        from model.evaluation.runner import EvalOptions, run
        from model.inference.jobs_io import parse_transform

        options = EvalOptions(
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            vit_transform=parse_transform(args.vit_transform, "--vit_transform") if args.vit_transform else None,
            vae_transform=parse_transform(args.vae_transform, "--vae_transform") if args.vae_transform else None,
            num_timesteps=args.num_timesteps, understanding=args.understanding,
            cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale,
            seed=args.seed, device=args.device, dtype=args.dtype, use_ema=not args.use_model_weights,
            fid_weights=args.fid_weights)
        metrics, stats = run(_items(args), args.model_path, args.out, options,
                             progress=None if args.quiet else sys.stderr)
        if not args.json:
            rate = metrics.get("text_records_per_second")
            print(f"{stats.done} records evaluated ({stats.errors} errors), {stats.skipped} already in "
                  f"{args.out / 'predictions.jsonl'}" + (f"; text {rate:.2f} records/s" if rate else ""))
    if args.json:
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
    else:
        rows = summary_rows(metrics)
        print(_table(rows, ["dataset", "kind", "n", "score"]) if rows else "nothing scored")
        for note in metrics.get("notes", []):
            print(f"note: {note}")
        print(f"wrote {args.out / 'metrics.json'}, {args.out / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 with one `error:` line for a user mistake (never a traceback), 130 when interrupted."""
    from model.evaluation.scoring import PredictionError
    from model.evaluation.sources import SourceError
    from model.inference.loading import InferenceError

    try:
        return _main(argv)
    except (UserError, PredictionError, SourceError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
