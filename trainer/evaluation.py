"""Validation during training (docs/evaluation.md#validation-during-training): the optional `eval:` section of
the mixture YAML, a fixed seeded subset of held-out datasets packed once, and CE / MSE computed exactly as the
training step computes them (same forward, same per-token means, CE loss reweighting included) without
gradients, sharded across ranks and summed.

    eval:
      datasets: [ct_chest_lung]   # catalog names (typically split: val / test), read from the mixture's shards
      every: 50                   # optimizer steps
      samples: 32                 # per dataset, a seeded subset: the same at every evaluation and after resume
      ema: false                  # evaluate the EMA weights instead of the trained ones
      metric: eval/ce             # best.json tracks this (lower is better)
      seed: 0

The subset, its packs, the CFG-dropout decisions (off for evaluation), timesteps and noise depend only on the
section and the shards, so every evaluation sees the same inputs, also after a stop and resume. Packs never
mix datasets, so per-dataset means are exact. Every rank runs the same number of forwards (ranks without a
pack of their own repeat one and do not count it): FSDP's collectives stay matched.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from trainer.loss import all_reduce_sum, local_ce_denominator

EVAL_KEYS = ("datasets", "every", "samples", "ema", "metric", "seed")
METRICS = ("eval/ce", "eval/mse")


class EvalConfigError(ValueError):
    """A mistake in the `eval:` section: names the file and key."""


@dataclass
class EvalSettings:
    datasets: list[str]
    every: int
    samples: int = 32
    ema: bool = False
    metric: str = "eval/ce"
    seed: int = 0


def parse_eval_section(raw: Any, where: str) -> Optional[EvalSettings]:
    """The `eval:` mapping -> EvalSettings (None when absent); every mistake names the key and what to write."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise EvalConfigError(f"{where}: 'eval' must be a mapping with datasets, every, samples")
    unknown = sorted(set(raw) - set(EVAL_KEYS))
    if unknown:
        raise EvalConfigError(f"{where}: eval.{unknown[0]} is not a known key; use {', '.join(EVAL_KEYS)}")
    names = raw.get("datasets")
    if isinstance(names, str):
        names = [names]
    if not names or not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise EvalConfigError(f"{where}: eval.datasets must list catalog dataset names, e.g. [chest_xray_val]")

    def count(key: str, default: Any, low: int) -> int:
        v = raw.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise EvalConfigError(f"{where}: eval.{key} must be a whole number >= {low}, got {v!r}")
        return v

    every = count("every", None, 1) if "every" in raw else None
    if every is None:
        raise EvalConfigError(f"{where}: eval.every (optimizer steps between evaluations) is missing")
    ema = raw.get("ema", False)
    if not isinstance(ema, bool):
        raise EvalConfigError(f"{where}: eval.ema must be true or false, got {ema!r}")
    metric = raw.get("metric", "eval/ce")
    allowed = list(METRICS) + [f"eval/{n}/{m}" for n in names for m in ("ce", "mse")]
    if metric not in allowed:
        raise EvalConfigError(f"{where}: eval.metric {metric!r} is not logged; use one of {', '.join(allowed)}")
    return EvalSettings(list(names), every, count("samples", 32, 1), ema, metric, count("seed", 0, 0))


def _seed(settings: EvalSettings, *parts: Any) -> int:
    return zlib.crc32(":".join(map(str, (settings.seed, *parts))).encode()) & 0x7FFFFFFF


def select_rows(rows: list[dict], samples: int, seed: int) -> list[dict]:
    """A seeded subset of `samples` rows, in sample_id order (independent of shard layout)."""
    ordered = sorted(rows, key=lambda r: r["sample_id"])
    if len(ordered) <= samples:
        return ordered
    picked = sorted(random.Random(seed).sample(range(len(ordered)), samples))
    return [ordered[i] for i in picked]


def load_eval_rows(mixture_path: Path, names: list[str], catalog: Optional[str] = None,
                   shards: Optional[str] = None) -> dict[str, tuple[list[dict], Optional[str], str]]:
    """{dataset: (shard rows, data_dir, task)} from the shards of the mixture's catalog."""
    import pyarrow.parquet as pq

    from datasets_catalog.catalog import load_catalog
    from pipelines.mixture.config import MixtureConfig

    mix = MixtureConfig.from_yaml(mixture_path).with_locations(catalog, shards)   # the run's --catalog / --shards
    catalog = load_catalog(mix.catalog_path())
    shards = mix.shards or catalog.output_dir
    out = {}
    for name in names:
        if name not in catalog.datasets:
            raise EvalConfigError(f"{mixture_path}: eval.datasets names {name!r}, which is not in the catalog "
                                  f"{catalog.path}; known: {', '.join(catalog.datasets)}")
        manifest_path = Path(shards) / name / "_manifest.json"
        if not manifest_path.is_file():
            raise EvalConfigError(f"{mixture_path}: eval dataset {name!r} has no shards in {Path(shards) / name}; "
                                  f"run python jobs/ingest.py {catalog.path} --only {name}")
        manifest = json.loads(manifest_path.read_text())
        rows = [r for s in manifest.get("shards", []) for r in pq.read_table(manifest_path.parent / s["file"]).to_pylist()]
        out[name] = (rows, manifest.get("data_dir"), manifest.get("task") or catalog.datasets[name].task.name)
    return out


def check_eval_section(mixture_path: str | Path, catalog: Optional[str] = None,
                       shards: Optional[str] = None) -> Optional[EvalSettings]:
    """Before launching (jobs/train.py): the section parses and every eval dataset has shards."""
    from datasets_catalog.catalog import load_catalog
    from pipelines.mixture.config import MixtureConfig

    mix = MixtureConfig.from_yaml(mixture_path).with_locations(catalog, shards)   # the run's --catalog / --shards
    settings = parse_eval_section(mix.eval, f"{mixture_path}: eval")
    if settings is None:
        return None
    catalog = load_catalog(mix.catalog_path())
    shards = Path(mix.shards or catalog.output_dir)
    for name in settings.datasets:
        if name not in catalog.datasets:
            raise EvalConfigError(f"{mixture_path}: eval.datasets names {name!r}, which is not in the catalog "
                                  f"{catalog.path}; known: {', '.join(catalog.datasets)}")
        if not (shards / name / "_manifest.json").is_file():
            raise EvalConfigError(f"{mixture_path}: eval dataset {name!r} has no shards in {shards / name}; run "
                                  f"python jobs/ingest.py {catalog.path} --only {name}")
        _check_shard_files(shards / name, catalog.path)
    return settings


def _check_shard_files(folder: Path, catalog_path: Path) -> None:
    """Every shard file the manifest lists is there and its footer reads (what the workers will read)."""
    from pipelines.storage.shard_reader import ShardReadError, open_shard

    for entry in json.loads((folder / "_manifest.json").read_text()).get("shards", []):
        try:
            open_shard(folder / entry["file"])
        except ShardReadError as exc:
            raise EvalConfigError(f"{exc.path}: {exc.problem}; re-run the ingest with --force --only {folder.name} "
                                  f"(python jobs/ingest.py {catalog_path} --force --only {folder.name})") from None


@dataclass
class _Pack:
    dataset: str
    batch: Any
    counted: bool = True


@dataclass
class TrainingEvaluator:
    """Built once per rank at setup; `maybe_run(trainer)` after each optimizer step."""

    settings: EvalSettings
    packs: list[_Pack]
    names: list[str]
    results_dir: Path
    is_main: bool
    history: list[dict] = field(default_factory=list)

    @classmethod
    def build(cls, trainer) -> Optional["TrainingEvaluator"]:
        """None without an `eval:` section (or without a mixture config)."""
        from pipelines.mixture.config import MixtureConfig
        from pipelines.packing.packer import build_packed_batch
        from pipelines.packing.sample import StreamSample
        from trainer.model_setup import packing_config

        path = trainer.cfg.mixture_path
        if not path:
            return None
        settings = parse_eval_section(MixtureConfig.from_yaml(path).eval, f"{path}: eval")
        if settings is None:
            return None
        config = replace(packing_config(trainer.cfg, trainer.mc), text_cond_dropout_prob=0.0,
                         vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.0)
        budget = trainer.cfg.data.expected_num_tokens
        packs: list[_Pack] = []
        for name, (rows, data_dir, task) in load_eval_rows(Path(path), settings.datasets, trainer.cfg.data.catalog,
                                                                  trainer.cfg.data.shards).items():
            chosen = select_rows(rows, settings.samples, _seed(settings, name))
            group: list = []
            for i, row in enumerate(chosen):
                sample = StreamSample(row["sample_id"], name, f"eval:{name}", row.get("task") or task,
                                      int(row["num_tokens"]), row, data_dir, draw_key=i)
                if group and sum(s.num_tokens for s in group) + sample.num_tokens > budget:
                    packs.append(_Pack(name, group))
                    group = []
                group.append(sample)
            if group:
                packs.append(_Pack(name, group))
        world, rank = trainer.world, trainer.rank
        mine = packs[rank::world]
        per_rank = math.ceil(len(packs) / world) if packs else 0
        while mine and len(mine) < per_rank:     # matched collectives: repeat a pack, not counted
            mine.append(_Pack(mine[0].dataset, mine[0].batch, counted=False))
        if not mine and per_rank:
            mine = [_Pack(packs[0].dataset, packs[0].batch, counted=False)] * per_rank
        seed = _seed(settings, "pack")
        built = [_Pack(p.dataset, build_packed_batch(p.batch, config, trainer.tokenizer, seed, on_image_error="raise"),
                       p.counted) for p in mine]
        names = list(dict.fromkeys(p.dataset for p in packs))
        return cls(settings, built, names, trainer.cfg.results_dir, trainer.is_main)

    def due(self, step: int, end_step: int) -> bool:
        return step % self.settings.every == 0 or step == end_step

    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, Any]:
        """{"step", "eval/ce", "eval/mse", "eval/<dataset>/ce", ..., "eval/seconds"} reduced over ranks."""
        start = time.perf_counter()
        t, device = trainer.cfg.train, trainer.device
        module = trainer.par.step_module
        if self.settings.ema:   # the EMA copy behind the same VAE-encode + forward wrapper (no DDP: no grads)
            from trainer.parallel import StepModule

            module = StepModule(trainer.ema, freeze_vae=True)
        index = {n: i for i, n in enumerate(self.names)}
        sums = torch.zeros(len(self.names), 4, dtype=torch.float64)    # ce_sum, ce_denom, mse_sum, mse_n
        for k, pack in enumerate(self.packs):
            batch = pack.batch.to(device, non_blocking=trainer.use_cuda)
            seed = _seed(self.settings, "noise", pack.dataset, k)
            idx = batch.packed_vae_token_indexes
            noise = None
            if idx is not None and idx.numel() > 0:
                g = torch.Generator(device=device).manual_seed(seed)
                noise = torch.randn(idx.numel(), trainer.channels, generator=g, device=device)
            vae_gen = torch.Generator(device=device).manual_seed(seed + 1)
            with (trainer.amp if trainer.amp is not None else contextlib.nullcontext()):
                out = module(batch, noise, vae_gen)
            if not pack.counted:
                continue
            row = sums[index[pack.dataset]]
            if out.ce is not None and out.ce.numel() > 0:
                ce = out.ce.float()
                if t.ce_loss_reweighting:
                    ce = ce * batch.ce_loss_weights.to(ce.device, torch.float32)
                row[0] += float(ce.sum())
                row[1] += local_ce_denominator(batch, t.ce_loss_reweighting)
            if out.mse is not None and out.mse.numel() > 0:
                row[2] += float(out.mse.float().mean(dim=-1).sum())
                row[3] += float(batch.num_mse_tokens)
        all_reduce_sum(sums)
        rec: dict[str, Any] = {"step": trainer.step}
        total = sums.sum(0)
        rec["eval/ce"] = float(total[0] / total[1]) if total[1] > 0 else None
        rec["eval/mse"] = float(total[2] / total[3]) if total[3] > 0 else None
        for n, i in index.items():
            rec[f"eval/{n}/ce"] = float(sums[i, 0] / sums[i, 1]) if sums[i, 1] > 0 else None
            rec[f"eval/{n}/mse"] = float(sums[i, 2] / sums[i, 3]) if sums[i, 3] > 0 else None
        rec["eval/seconds"] = time.perf_counter() - start
        return rec

    def maybe_run(self, trainer) -> Optional[dict[str, Any]]:
        if not self.due(trainer.step, trainer.end_step):
            return None
        rec = self.evaluate(trainer)
        self.history.append(rec)
        if self.is_main:
            trainer.sink.log_extra(rec, format_eval(rec))
        return rec

    def record_best(self, rec: dict[str, Any], checkpoint: Optional[Path]) -> None:
        """best.json (run directory, atomic): the lowest value of the chosen metric so far and its step and
        checkpoint (null when no checkpoint was saved at that step: align save_every with eval.every)."""
        if not self.is_main:
            return
        value = rec.get(self.settings.metric)
        if value is None:
            return
        path = self.results_dir / "best.json"
        best = json.loads(path.read_text()) if path.is_file() else None
        if best is not None and best.get("value") is not None and best["value"] <= value:
            return
        data = {"metric": self.settings.metric, "mode": "min", "value": value, "step": rec["step"],
                "checkpoint": str(checkpoint) if checkpoint is not None else None,
                "ema": self.settings.ema}
        from pipelines.storage.uris import write_bytes_atomic

        write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def format_eval(rec: dict[str, Any]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.4f}"

    per = " ".join(f"{k[5:]}={f(v)}" for k, v in rec.items() if k.count("/") == 2)
    return (f"eval step {rec['step']:>6} | ce {f(rec.get('eval/ce'))} | mse {f(rec.get('eval/mse'))} | "
            f"{rec['eval/seconds']:.2f} s" + (f" | {per}" if per else ""))
