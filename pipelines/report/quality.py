"""Dataset quality report: one self-contained HTML page over a shards folder.

`build_report(shards_dir)` scans the shards (no image bytes except for a few thumbnails), finds duplicate
images by content hash within and across datasets, and lists train/validation leakage first.
`render_html(report)` draws every plot as a PNG embedded as a data: URI, so the page can be mailed or
archived as one file. `write_report()` does both and writes atomically.

Other tools call `find_leakage()` / `leakage_warnings()` (re-exported from `report_scan`), e.g. the
ingest summary.
"""
from __future__ import annotations

import base64
import html
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.storage import uris as storage
from pipelines.report.scan import (  # noqa: F401 - re-exported API
    DuplicateGroup, LeakagePair, ShardScan, find_duplicates, find_leakage, leakage_pairs, leakage_warnings,
    scan_shards,
)

MAX_DUPLICATE_GROUPS_SHOWN = 200


@dataclass
class QualityReport:
    scan: ShardScan
    duplicates: list[DuplicateGroup]
    leakage: list[LeakagePair]
    thumbnails: dict[str, list] = field(default_factory=dict)
    seed: int = 0

    def summary(self) -> dict[str, Any]:
        """Machine-readable summary (the `--json` output of jobs/report.py)."""
        kinds = Counter(g.kind for g in self.duplicates)
        return {
            "shards_dir": str(self.scan.root),
            "datasets": {
                name: {"rows": s.rows, "images": s.images, "split": s.split, "modality": s.modality,
                       "task": s.task, "rejected": sum(s.rejects.values()), "reject_reasons": dict(s.rejects),
                       "image_modalities": dict(s.image_modalities), "formats": dict(s.formats)}
                for name, s in self.scan.datasets.items()
            },
            "duplicate_groups": {"leakage": kinds.get("leakage", 0), "cross_dataset": kinds.get("cross_dataset", 0),
                                 "within_dataset": kinds.get("within_dataset", 0)},
            "leakage": [{"sha256": p.sha256,
                         "train": {"dataset": p.train.dataset, "sample_id": p.train.sample_id,
                                   "line_number": p.train.line_number, "path": p.train.path},
                         "eval": {"dataset": p.eval.dataset, "split": p.eval.split, "sample_id": p.eval.sample_id,
                                  "line_number": p.eval.line_number, "path": p.eval.path}}
                        for p in self.leakage],
        }


def build_report(shards_dir: str | Path, seed: int = 0, thumbnails: int = 8,
                 only: list[str] | None = None) -> QualityReport:
    """Scan a shards folder and collect everything the page shows (thumbnails: per dataset, 0 for none)."""
    from pipelines.report.thumbs import dataset_thumbnails

    scan = scan_shards(shards_dir, only)
    groups = find_duplicates(scan.images)
    report = QualityReport(scan=scan, duplicates=groups, leakage=leakage_pairs(groups), seed=seed)
    if thumbnails > 0:
        for name, stats in scan.datasets.items():
            report.thumbnails[name] = dataset_thumbnails(stats, thumbnails, seed)
    return report


# -- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.num{text-align:right}.bad{background:#fde2e2}.warn{color:#a40000;font-weight:600}
.ok{color:#1b6e20;font-weight:600}.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.plots figure{margin:0}.plots figcaption{font-weight:600;margin:4px 0}.plots img{max-width:100%;border:1px solid #eee}
.grid{display:flex;flex-wrap:wrap;gap:8px}.thumb{width:170px;font-size:11px;word-break:break-all}
.thumb img{border:1px solid #ccc;max-width:160px;max-height:160px}.muted{color:#777}
"""


def _img(png: bytes, alt: str, cls: str = "plot") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _dataset_table(report: QualityReport) -> str:
    rows = []
    for name, s in report.scan.datasets.items():
        rejected = sum(s.rejects.values())
        read = s.rows + rejected
        mods = ", ".join(f"{k} ({v})" for k, v in s.image_modalities.most_common()) or "—"
        fmts = ", ".join(f"{k} ({v})" for k, v in s.formats.most_common()) or "—"
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{_e(s.task)}</td><td>{_e(s.split)}</td><td>{_e(s.modality)}</td>"
            f"<td>{_e(mods)}</td><td class=num>{s.rows}</td><td class=num>{rejected}"
            f"{f' ({100 * rejected / read:.1f}%)' if read else ''}</td><td class=num>{s.images}</td>"
            f"<td>{_e(fmts)}</td></tr>"
        )
    return ("<table><tr><th>dataset</th><th>task</th><th>split</th><th>modality (catalog)</th>"
            "<th>modality (image headers)</th><th>rows</th><th>rejected</th><th>images</th><th>formats</th></tr>"
            + "".join(rows) + "</table>")


def _duplicates_section(report: QualityReport) -> str:
    parts = []
    if report.leakage:
        parts.append(f'<p class="warn">Train/validation leakage: {len(report.leakage)} pair(s) of rows share '
                     f'an image between a training and a validation/test dataset.</p>')
        parts.append("<table><tr><th>train row</th><th>validation/test row</th><th>sha256</th></tr>" + "".join(
            f"<tr class=bad><td>{_e(p.train.describe())}</td><td>{_e(p.eval.describe())}</td>"
            f"<td><code>{_e(p.sha256[:16])}</code></td></tr>" for p in report.leakage) + "</table>")
    else:
        parts.append('<p class="ok">No train/validation leakage found.</p>')
    others = [g for g in report.duplicates if g.kind != "leakage"]
    if others:
        shown = others[:MAX_DUPLICATE_GROUPS_SHOWN]
        parts.append(f"<p>{len(others)} other group(s) of identical images "
                     f"({sum(g.kind == 'cross_dataset' for g in others)} across datasets, "
                     f"{sum(g.kind == 'within_dataset' for g in others)} within one dataset)"
                     f"{'; first ' + str(len(shown)) + ' shown' if len(shown) < len(others) else ''}.</p>")
        parts.append("<table><tr><th>kind</th><th>rows</th><th>sha256</th></tr>" + "".join(
            f"<tr><td>{_e(g.kind)}</td><td>{'<br>'.join(_e(r.describe()) for r in g.refs)}</td>"
            f"<td><code>{_e(g.sha256[:16])}</code></td></tr>" for g in shown) + "</table>")
    else:
        parts.append("<p>No other duplicate images.</p>")
    return "\n".join(parts)


def _plots(report: QualityReport) -> list[tuple[str, bytes]]:
    from pipelines.report import plots as rp

    ds = report.scan.datasets
    rows_by_mod: dict[str, dict[str, int]] = {}
    for name, s in ds.items():
        if s.image_modalities:  # DICOM/NIfTI headers: count images by the modality they declare
            rows_by_mod[name] = {f"{k} (header)": v for k, v in s.image_modalities.items()}
        else:
            rows_by_mod[name] = {s.modality or "unspecified": s.rows}
    plots = [
        ("Rows per dataset and modality", rp.stacked_bars(rows_by_mod, "Rows (or images with a header modality) "
                                                                       "per dataset", "count")),
        ("Reject reasons", rp.stacked_bars({n: dict(s.rejects) for n, s in ds.items() if s.rejects},
                                           "Rejected rows per dataset by reason", "rows")),
        ("Image sizes", rp.size_scatter({n: (s.widths, s.heights) for n, s in ds.items()}, "Image size (width x height)")),
        ("Image long side", rp.histograms({n: [max(w, h) for w, h in zip(s.widths, s.heights)] for n, s in ds.items()},
                                          "Image long side (px)", "pixels", log_x=True)),
        ("Aspect ratios", rp.histograms({n: [w / h for w, h in zip(s.widths, s.heights) if h] for n, s in ds.items()},
                                        "Aspect ratio (width / height)", "aspect ratio", log_x=True)),
        ("VAE tokens per image", rp.histograms({n: s.vae_tokens for n, s in ds.items()}, "VAE tokens per image",
                                               "tokens")),
        ("ViT tokens per image", rp.histograms({n: s.vit_tokens for n, s in ds.items()}, "ViT tokens per image",
                                               "tokens")),
        ("Text tokens per sample", rp.histograms({n: s.text_tokens for n, s in ds.items()}, "Text tokens per sample",
                                                 "tokens")),
        ("Packed length per sample", rp.histograms({n: s.num_tokens for n, s in ds.items()},
                                                   "Packed sequence length per sample (num_tokens)", "tokens")),
    ]
    return plots


def _thumbs_section(report: QualityReport) -> str:
    if not report.thumbnails:
        return "<p class=muted>Thumbnails disabled.</p>"
    parts = []
    for name, thumbs in report.thumbnails.items():
        parts.append(f"<h3>{_e(name)}</h3>")
        if not thumbs:
            parts.append("<p class=muted>No rows with images.</p>")
            continue
        cells = []
        for t in thumbs:
            body = _img(t.png, t.sample_id, "thumbimg") if t.png else f'<span class="warn">{_e(t.error)}</span>'
            cells.append(f'<div class="thumb">{body}<br>{_e(t.caption)}</div>')
        parts.append('<div class="grid">' + "".join(cells) + "</div>")
    return "\n".join(parts)


def render_html(report: QualityReport) -> str:
    plots = _plots(report)
    summary_json = json.dumps(report.summary()).replace("</", "<\\/")  # safe inside <script>
    n_rows = sum(s.rows for s in report.scan.datasets.values())
    status = (f'<span class="warn">{len(report.leakage)} leakage pair(s)</span>' if report.leakage
              else '<span class="ok">no leakage</span>')
    body = [
        f"<h1>Dataset quality report</h1><p class=muted>{_e(report.scan.root)} · {len(report.scan.datasets)} "
        f"dataset(s) · {n_rows} rows · {len(report.scan.images)} images · {status} · thumbnail seed {report.seed}</p>",
        "<h2>Duplicates and train/validation leakage</h2>", _duplicates_section(report),
        "<h2>Datasets</h2>", _dataset_table(report),
        '<h2>Distributions</h2><div class="plots">',
        *(f"<figure><figcaption>{_e(title)}</figcaption>{_img(png, title)}</figure>" for title, png in plots),
        "</div>",
        "<h2>Random samples (decoded as the trainer sees them)</h2>", _thumbs_section(report),
        f"<script type=\"application/json\" id=\"summary\">{summary_json}</script>",
    ]
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>MedLoom dataset quality report</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>")


def write_report(shards_dir: str | Path, out: str | Path, seed: int = 0, thumbnails: int = 8,
                 only: list[str] | None = None) -> QualityReport:
    """Build the report and write the HTML atomically (temp file in the same folder, then rename)."""
    report = build_report(shards_dir, seed=seed, thumbnails=thumbnails, only=only)
    storage.write_text_atomic(Path(out), render_html(report))
    return report
