#!/usr/bin/env python
"""Plot a training run: loss curves (CE, MSE), learning rate and the realised mixture shares.

The mixture panels show each group's realised share of samples next to its configured weight (dashed, as
logged by the trainer: the weight in force at that step, so curriculum stages show as steps) and the share
of packed tokens; stage boundaries are marked and named.

    python jobs/plot.py runs/radiology_sft                 # -> runs/radiology_sft/training_curves.png
    python jobs/plot.py runs/radiology_sft --out docs/training_curves.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs import prog


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl records, one per step: a step's training and evaluation records are merged, later
    records winning (a restarted run re-logs some steps)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the run directory (storage_path/name) of a training run")
    by_step: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}, line {n}: not valid JSON") from None
        by_step.setdefault(int(rec["step"]), {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def plot(records: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, grid = plt.subplots(2, 2, figsize=(15, 9))
    axes = grid.ravel()
    ax = axes[0]
    for key, color in (("ce", "tab:blue"), ("mse", "tab:orange")):
        pts = [(s, r[key]) for s, r in zip(steps, records) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=key.upper(), color=color, marker=".")
    for key, color in (("eval/ce", "tab:blue"), ("eval/mse", "tab:orange")):   # validation (eval: section)
        pts = [(s, r[key]) for s, r in zip(steps, records) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=f"{key.split('/')[1].upper()} (eval)", color=color, linestyle="--", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (global per-token mean)")
    ax.set_title("losses")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    lr_points = [(s, r["lr"]) for s, r in zip(steps, records) if "lr" in r]
    if lr_points:
        ax.plot(*zip(*lr_points), color="tab:green")
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [100 * r.get("data_wait_fraction", 0.0) for r in records], color="tab:red", alpha=0.6)
    ax2.set_ylabel("data wait, % of step time", color="tab:red")
    groups = sorted({k.split("/", 1)[1] for r in records for k in r
                     if k.startswith(("share_samples/", "share_tokens/", "weight/"))})
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    for ax, key, label in ((axes[2], "share_samples", "share of samples (per log window)"),
                           (axes[3], "share_tokens", "share of packed tokens (per log window)")):
        for g in groups:
            pts = [(s, r[f"{key}/{g}"]) for s, r in zip(steps, records) if f"{key}/{g}" in r]
            if pts:
                ax.plot(*zip(*pts), label=f"{g} realised", color=colors[g], marker=".")
            weights = [(s, r[f"weight/{g}"]) for s, r in zip(steps, records) if f"weight/{g}" in r]
            if weights:
                ax.step(*zip(*weights), where="pre", linestyle="--", color=colors[g], alpha=0.8,
                        label=f"{g} weight")
        _mark_stages(ax, records)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    axes[2].set_title("mixture: realised sample shares vs configured weights (dashed)")
    axes[3].set_title("mixture: realised token shares")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def _mark_stages(ax, records: list[dict]) -> None:
    """A vertical line and the stage name where a curriculum stage begins (records with `stage_name`)."""
    seen = []
    for r in records:
        name = r.get("stage_name")
        if name is not None and name not in seen:
            seen.append(name)
            start = r.get("stage_start_step", r["step"])
            ax.axvline(start, color="grey", linestyle=":", linewidth=1)
            ax.text(start, 0.98, f" {name}", va="top", fontsize=7, color="grey")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog("jobs/plot.py"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl (storage_path/name)")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/training_curves.png)")
    args = ap.parse_args(argv)
    try:
        records = read_metrics(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: {args.run_dir}/metrics.jsonl has no records yet", file=sys.stderr)
        return 2
    out = plot(records, args.out or args.run_dir / "training_curves.png", f"{args.run_dir.name}")
    first, last = records[0], records[-1]
    print(f"{len(records)} log points, steps {first['step']}..{last['step']}; "
          f"CE {first.get('ce')} -> {last.get('ce')}; MSE {first.get('mse')} -> {last.get('mse')}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
