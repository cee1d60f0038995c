"""report.html of jobs/evaluate.py: one self-contained page (every image a data: URI, no scripts, no external
links) with the metrics tables, per-modality bars and example cards, worst cases first."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Callable

from PIL import Image

CARD_LIMIT = 60
THUMB = 160
HEADLINE = {"closed": "accuracy", "open": "recall", "report": "rouge_l", "image": "ssim"}


def data_uri(image: Image.Image, size: int = THUMB) -> str:
    im = image.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def _table(rows: dict[str, dict[str, Any]], first: str) -> str:
    cols = [("n", "n"), ("errors", "errors")]
    for kind in ("closed", "open", "report", "image"):
        keys = sorted({k for r in rows.values() for k in (r.get(kind) or {})} - {"n"}, key=lambda k: (k != HEADLINE[kind], k))
        if any(kind in r for r in rows.values()):
            cols += [((kind, "n"), f"{kind} n")] + [((kind, k), f"{kind} {k}") for k in keys]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in cols)
    body = []
    for name, r in rows.items():
        cells = []
        for key, _ in cols:
            v = r.get(key, "") if isinstance(key, str) else (r.get(key[0]) or {}).get(key[1], "")
            cells.append(f"<td>{_fmt(v)}</td>")
        body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>{html.escape(first)}</th>{head}</tr>{''.join(body)}</table>"


def _bars(modalities: dict[str, dict[str, Any]]) -> str:
    out = []
    for kind, metric in HEADLINE.items():
        items = [(m, r[kind][metric]) for m, r in modalities.items() if kind in r and metric in r[kind]]
        if not items:
            continue
        out.append(f"<h3>{kind}: {metric} per modality</h3><div class='bars'>")
        for m, v in items:
            width = max(0.0, min(1.0, float(v))) * 100
            out.append(f"<div class='bar'><span class='label'>{html.escape(m)}</span><span class='track'>"
                       f"<span class='fill' style='width:{width:.1f}%'></span></span><span>{v:.3f}</span></div>")
        out.append("</div>")
    return "".join(out)


def badness(row: dict[str, Any]) -> float:
    """0 = worst: errors first, then the row's headline score (images: SSIM)."""
    if row.get("error"):
        return -1.0
    scores = row.get("scores") or {}
    metric = HEADLINE.get(row.get("answer_type", ""), "")
    return float(scores.get(metric, 0.0))


def _card(row: dict[str, Any], load_image: Callable[[dict[str, Any]], list[Image.Image]]) -> str:
    verdict = row.get("correct")
    cls = "err" if row.get("error") else ("ok" if verdict else ("bad" if verdict is False else "neutral"))
    imgs = ""
    try:
        imgs = "".join(f"<img src='{data_uri(im)}' alt='image'>" for im in load_image(row))
    except Exception as exc:  # a missing image must not break the page: say so on the card
        imgs = f"<p class='note'>image not shown: {html.escape(str(exc))}</p>"
    scores = ", ".join(f"{k} {v:.3f}" for k, v in (row.get("scores") or {}).items())
    label = {"ok": "correct", "bad": "wrong", "err": "error", "neutral": ""}[cls]
    fields = [("dataset", row.get("dataset")), ("question", row.get("question")),
              ("reference", row.get("reference")), ("prediction", row.get("prediction")),
              ("error", row.get("error"))]
    text = "".join(f"<p><b>{k}</b>: {html.escape(str(v))}</p>" for k, v in fields if v)
    return (f"<div class='card {cls}'><div class='imgs'>{imgs}</div><p class='id'>{html.escape(str(row.get('sample_id')))}"
            f" · {html.escape(str(row.get('answer_type')))} <span class='verdict'>{label}</span></p>{text}"
            f"<p class='scores'>{html.escape(scores)}</p></div>")


CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child{text-align:left}
.bars{max-width:640px}.bar{display:flex;gap:8px;align-items:center;margin:2px 0}.label{width:140px}
.track{flex:1;background:#eee;height:14px}.fill{display:block;height:14px;background:#3b7dd8}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{width:340px;border:2px solid #ccc;padding:8px;font-size:13px}
.card.ok{border-color:#2a9d4b}.card.bad{border-color:#d33}.card.err{border-color:#e90}
.card img{max-width:160px;margin-right:4px}.verdict{font-weight:bold}.note{color:#777}"""


def render(metrics: dict[str, Any], rows: list[dict[str, Any]],
           load_image: Callable[[dict[str, Any]], list[Image.Image]]) -> str:
    """The page as a string; `load_image(row)` returns the PIL images to show on a card (input, generated)."""
    worst = sorted(rows, key=badness)[:CARD_LIMIT]
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in metrics.get("notes", []))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>MedLoom evaluation</title>"
             f"<style>{CSS}</style></head><body><h1>Evaluation of {html.escape(str(metrics.get('model_path')))}</h1>",
             notes, "<h2>Per dataset</h2>", _table(metrics.get("datasets", {}), "dataset"),
             "<h2>Per modality</h2>", _table(metrics.get("modalities", {}), "modality"),
             _bars(metrics.get("modalities", {})),
             "<h2>Per answer type</h2>",
             _table({k: {"n": v.get("n", 0), k: v} for k, v in metrics.get("answer_types", {}).items()}, "answer type"),
             f"<h2>Examples, worst first ({len(worst)} of {len(rows)})</h2><div class='cards'>",
             "".join(_card(r, load_image) for r in worst), "</div></body></html>"]
    return "".join(parts)


def write_report(path: Path, metrics: dict[str, Any], rows: list[dict[str, Any]],
                 load_image: Callable[[dict[str, Any]], list[Image.Image]]) -> Path:
    from pipelines.storage.uris import write_bytes_atomic

    write_bytes_atomic(Path(path), render(metrics, rows, load_image).encode("utf-8"))
    return Path(path)
