#!/usr/bin/env python
"""Plot a training run: loss curves (CE, MSE), learning rate and the realised mixture shares.

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
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
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
    ax = axes[2]
    groups = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("share_tokens/")})
    for g in groups:
        ax.plot(steps, [r.get(f"share_tokens/{g}", 0.0) for r in records], label=g, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("share of packed tokens (per log window)")
    ax.set_title("realised mixture")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


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
