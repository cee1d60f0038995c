"""The evaluation run of jobs/evaluate.py (docs/evaluation.md): answer or generate every record, score it,
append it to predictions.jsonl (resumable), then write metrics.json and report.html.

predictions.jsonl is appended one flushed line per record, so an interrupted run keeps what it finished and a
rerun into the same folder skips every sample_id already there (a torn last line is ignored and redone).
metrics.json and report.html are written atomically at the end, from the whole predictions file.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

from PIL import Image

from model.inference.loading import InferenceError

from .image_metrics import fid_note, psnr_ssim
from .scoring import (PredictionError, aggregate, answer_type_of, is_correct, parse_prediction_line, score_row)
from .sources import EvalItem, ImageSource

PREDICTIONS, METRICS, REPORT = "predictions.jsonl", "metrics.json", "report.html"


@dataclass
class EvalOptions:
    max_new_tokens: int = 512
    batch_size: int = 8                 # text records decoded together; 1 = one at a time
    vit_transform: Any = None           # None: each dataset's own (shards), else the checkpoint's default
    vae_transform: Any = None
    num_timesteps: int = 50
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 2.0
    understanding: str = "append"       # edits: as jobs/generate.py --understanding
    seed: int = 42
    device: str | None = None
    dtype: str | None = None
    use_ema: bool = True
    fid_weights: Path | None = None


@dataclass
class RunStats:
    done: int = 0
    skipped: int = 0
    errors: int = 0
    text_seconds: float = 0.0
    text_records: int = 0
    notes: list[str] = field(default_factory=list)


class Progress:
    """One status line on stderr: done/total, rate and ETA."""

    def __init__(self, total: int, stream: TextIO | None = sys.stderr) -> None:
        self.total, self.stream, self.start, self.done = total, stream, time.perf_counter(), 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.stream is None:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        end = "\n" if self.done >= self.total else "\r"
        print(f"[evaluate] {self.done}/{self.total} records  {rate:.2f} rec/s  ETA {eta:.0f} s", end=end,
              file=self.stream, flush=True)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Rows of an existing predictions.jsonl of ours (a torn or invalid line is ignored: it is redone)."""
    rows = []
    if not path.is_file():
        return rows
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("sample_id"):
            rows.append(obj)
    return rows


def load_predictions_file(path: Path) -> list[dict[str, Any]]:
    """A user's predictions file (--predictions): every bad line is an error naming file, line and field."""
    if not path.is_file():
        raise PredictionError(f"--predictions {path}: no such file")
    rows = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if raw.strip():
            row = parse_prediction_line(raw, f"{path}:{n}")
            row.setdefault("sample_id", f"{row.get('dataset', '?')}:{n}")
            rows.append(row)
    return rows


def _base_row(item: EvalItem) -> dict[str, Any]:
    return {"sample_id": item.sample_id, "dataset": item.dataset, "task": item.task,
            "modality": item.modality or item.extra.get("modality"), "question": item.question,
            "reference": item.reference}


def text_row(item: EvalItem, prediction: str) -> dict[str, Any]:
    kind = answer_type_of(item.reference, item.extra, item.report_dataset)
    row = score_row({**_base_row(item), "prediction": prediction, "answer_type": kind})
    row["correct"] = is_correct(kind, row["scores"])
    return row


def error_row(item: EvalItem, error: str) -> dict[str, Any]:
    return {**_base_row(item), "prediction": None, "answer_type": None, "error": error}


def _safe_name(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", sample_id) + ".png"


class Evaluator:
    """Loads the model lazily (only when a record needs it) and runs text and image records."""

    def __init__(self, model_path: str | Path, out: Path, options: EvalOptions) -> None:
        self.model_path, self.out, self.opt = model_path, out, options
        self._vqa = self._gen = None

    def vqa(self):
        if self._vqa is None:
            from model.inference.api import VQAInferencer

            self._vqa = VQAInferencer(self.model_path, device=self.opt.device, dtype=self.opt.dtype,
                                      use_ema=self.opt.use_ema)
        return self._vqa

    def generator(self):
        if self._gen is None:
            from model.inference.api import ImageGenerator

            self._gen = ImageGenerator(self.model_path, device=self.opt.device, dtype=self.opt.dtype,
                                       use_ema=self.opt.use_ema)
        return self._gen

    def _vit_for(self, item: EvalItem):
        """The flag, else the dataset's own (shards), else the checkpoint's default (model/inference/defaults.py)."""
        return self.opt.vit_transform or item.vit_transform or self.vqa().defaults.vit_transform

    def answer_texts(self, items: list[EvalItem]) -> list[dict[str, Any]]:
        """Greedy answers: one at a time (batch_size 1) or prepared sessions decoded together."""
        inf = self.vqa()
        rows: list[dict[str, Any] | None] = [None] * len(items)
        ready: list[tuple[int, Any]] = []
        for i, item in enumerate(items):
            inf.vit_transform = self._vit_for(item)
            try:
                images = [s.load() for s in item.images]
                if self.opt.batch_size <= 1:
                    answer = inf.chat(images, item.messages, max_new_tokens=self.opt.max_new_tokens,
                                      do_sample=False, seed=self.opt.seed)
                    rows[i] = text_row(item, answer)
                else:
                    ready.append((i, inf.prepare(images, item.messages, seed=self.opt.seed)))
            except (InferenceError, ValueError) as exc:
                rows[i] = error_row(item, str(exc))
        if ready:
            answers = inf.answer_batch([s for _, s in ready], max_new_tokens=self.opt.max_new_tokens)
            for (i, _), answer in zip(ready, answers):
                rows[i] = text_row(items[i], answer)
        return [r for r in rows if r is not None]

    def generate_image(self, item: EvalItem) -> dict[str, Any]:
        from model.inference.jobs_io import save_png

        gen = self.generator()
        gen.vae_transform = self.opt.vae_transform or item.vae_transform or gen.defaults.gen_vae_transform
        gen.vit_transform = self.opt.vit_transform or item.vit_transform or gen.defaults.gen_vit_transform
        try:
            source = item.images[0].load() if item.images else None
            target = item.target.load()
            shape = None if source is not None else _target_shape(target, gen.vae_transform)
            # "turn" is the layout of edit training records: the human text verbatim, <image> tags kept
            instruction = item.messages[-1].value.strip() if self.opt.understanding == "turn" else item.question
            result = gen.infer_single(source, instruction, cfg_text_scale=self.opt.cfg_text_scale,
                                      understanding=self.opt.understanding,
                                      cfg_img_scale=self.opt.cfg_img_scale, num_timesteps=self.opt.num_timesteps,
                                      seed=self.opt.seed, image_shape=shape)
        except (InferenceError, ValueError) as exc:
            return error_row(item, str(exc))
        name = _safe_name(item.sample_id)
        save_png(result.image, self.out / "images" / name)
        scores = psnr_ssim(target, result.image)
        return {**_base_row(item), "reference": None, "prediction": result.understanding or result.thought,
                "answer_type": "image", "image_path": f"images/{name}", "scores": scores, "correct": None}


def _target_shape(target: Image.Image, vae) -> tuple[int, int]:
    from datasets_catalog.transforms import resize_target

    w, h = resize_target(target.width, target.height, vae)
    return h, w


def run(items: Iterable[EvalItem], model_path: str | Path, out: Path, options: EvalOptions,
        progress: TextIO | None = sys.stderr) -> tuple[dict[str, Any], RunStats]:
    """Evaluate every item not yet in out/predictions.jsonl, then score everything there."""
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS
    existing = read_predictions(pred_path)
    seen = {r["sample_id"] for r in existing}
    if existing and pred_path.read_bytes()[-1:] != b"\n":   # a torn last line: rewrite without it
        pred_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in existing), encoding="utf-8")
    items = list(items)
    todo = [it for it in items if it.sample_id not in seen]
    stats = RunStats(skipped=len(items) - len(todo))
    evaluator = Evaluator(model_path, out, options)
    bar = Progress(len(todo), progress)
    by_id = {it.sample_id: it for it in items}
    with pred_path.open("a", encoding="utf-8") as fh:
        def emit(rows: list[dict[str, Any]]) -> None:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                stats.done += 1
                stats.errors += bool(row.get("error"))
            fh.flush()
            bar.advance(len(rows))

        texts = [it for it in todo if it.error is None and not it.is_image]
        emit([error_row(it, it.error) for it in todo if it.error is not None])
        step = max(1, options.batch_size)
        if texts:
            evaluator.vqa()   # load before timing: text records/s measures decoding, not loading
        for start in range(0, len(texts), step):
            chunk = texts[start:start + step]
            t0 = time.perf_counter()
            rows = evaluator.answer_texts(chunk)
            stats.text_seconds += time.perf_counter() - t0
            stats.text_records += len(chunk)
            emit(rows)
        for it in todo:
            if it.error is None and it.is_image:
                emit([evaluator.generate_image(it)])
    rows = read_predictions(pred_path)
    metrics = finish(rows, str(model_path), out, stats, by_id, options.fid_weights)
    return metrics, stats


def image_loader(out: Path, by_id: dict[str, EvalItem]):
    """Card images: the record's input images (from the sources) and the generated image, if any."""

    def load(row: dict[str, Any]) -> list[Image.Image]:
        images = []
        item = by_id.get(row.get("sample_id", ""))
        if item is not None:
            images += [s.load() for s in item.images[:2]]
            if item.target is not None:
                images.append(item.target.load())
        if row.get("image_path"):
            images.append(Image.open(out / row["image_path"]).convert("RGB"))
        return images

    return load


def finish(rows: list[dict[str, Any]], model_path: str | None, out: Path, stats: RunStats | None = None,
           by_id: dict[str, EvalItem] | None = None, fid_weights: Path | None = None) -> dict[str, Any]:
    """metrics.json and report.html from scored rows (atomic writes)."""
    from pipelines.storage.uris import write_bytes_atomic

    from .html_report import write_report

    metrics: dict[str, Any] = {"model_path": model_path, **aggregate(rows)}
    notes = list(stats.notes) if stats else []
    image_rows = [r for r in rows if r.get("answer_type") == "image" and not r.get("error")]
    if image_rows:
        notes.append(fid_note(fid_weights))
    if stats is not None and stats.text_records:
        metrics["text_records_per_second"] = stats.text_records / stats.text_seconds if stats.text_seconds else None
    metrics["notes"] = notes
    write_bytes_atomic(out / METRICS, (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode())
    write_report(out / REPORT, metrics, rows, image_loader(out, by_id or {}))
    return metrics


def score_predictions(path: Path, out: Path) -> dict[str, Any]:
    """--predictions: score an existing file (any model's outputs), no model needed."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [score_row(r) for r in load_predictions_file(path)]
    for r in rows:
        if r.get("scores"):
            r["correct"] = is_correct(r["answer_type"], r["scores"])
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    from pipelines.storage.uris import write_bytes_atomic

    write_bytes_atomic(out / PREDICTIONS, text.encode("utf-8"))
    return finish(rows, None, out)


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    """Rows [dataset, metric, A, B, B - A] for every headline metric both files have."""
    from .html_report import HEADLINE

    table = []
    for name in sorted(set(a.get("datasets", {})) | set(b.get("datasets", {}))):
        da, db = a.get("datasets", {}).get(name, {}), b.get("datasets", {}).get(name, {})
        for kind in ("closed", "open", "report", "image"):
            metrics = sorted(set((da.get(kind) or {})) | set((db.get(kind) or {})) - {"n"},
                             key=lambda m: (m != HEADLINE[kind], m))
            for m in metrics:
                va, vb = (da.get(kind) or {}).get(m), (db.get(kind) or {}).get(m)
                delta = f"{vb - va:+.4f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else "-"
                table.append([name, f"{kind}/{m}", "-" if va is None else f"{va:.4f}",
                              "-" if vb is None else f"{vb:.4f}", delta])
    return table
