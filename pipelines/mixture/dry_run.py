"""Dry runs of a mixture from metadata only (no image is decoded): what `jobs/plan.py` prints.

`plan_mixture` runs the real stream logic (the same `MixtureStream.next_plan` the trainer's packs come
from) for every rank of a world size, so shares, passes and packing efficiency are what training will see.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import pyarrow.compute as pc

from datasets_catalog.tokenizer import TextTokenizer

from pipelines.mixture.stream import MixtureStream
from pipelines.mixture.config import MixtureConfig
from pipelines.mixture.recompute import RECOMPUTE_COLUMNS, recompute_row
from pipelines.mixture.sources import ResolvedMixture, resolve_sources
from pipelines.mixture.stages import normalised, stage_start
from pipelines.packing.config import PackingConfig
from pipelines.storage.shard_reader import RowGroupCache

NEVER_FIT_IDS = 20


def packing_from_config(cfg: MixtureConfig, **overrides: Any) -> PackingConfig:
    """PackingConfig defaults, then the config's `train:` keys of the same names, then `overrides`."""
    names = {f.name for f in fields(PackingConfig)}
    values = {k: v for k, v in (cfg.train or {}).items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PackingConfig(**values)


def tokenizer_for(resolved: ResolvedMixture) -> TextTokenizer:
    """The catalog's tokenizer (`load_catalog` already resolved a tokenizer folder to an absolute path)."""
    return TextTokenizer.load(resolved.catalog.tokenizer)


def never_fit_scan(resolved: ResolvedMixture, limit: int, tokenizer: TextTokenizer) -> dict[str, Any]:
    """Rows longer than `limit` (max_num_tokens_per_sample) in every dataset the mixture uses: a full
    metadata scan, one row group at a time, so the count does not depend on how long the dry run is."""
    by_dataset: dict[str, int] = {}
    ids: list[str] = []
    cache = RowGroupCache(max_bytes=32 << 20, max_items=2)
    seen = set()
    for group in resolved.groups:
        for ds in group.datasets:
            if ds.name in seen:
                continue
            seen.add(ds.name)
            count = 0
            for rg in range(len(ds.layout.rg_rows)):
                path, rgi = ds.layout.row_group(rg)
                if ds.recompute is None:
                    table = cache.table(path, rgi, ("sample_id", "num_tokens"))
                    mask = pc.greater(table.column("num_tokens"), limit)
                    hit = table.filter(mask).column("sample_id").to_pylist()
                else:
                    table = cache.table(path, rgi, ("sample_id", "num_tokens") + RECOMPUTE_COLUMNS)
                    hit = [r["sample_id"] for r in table.to_pylist()
                           if recompute_row(r, ds.task, *ds.recompute, tokenizer)["num_tokens"] > limit]
                count += len(hit)
                ids.extend(hit[: max(0, NEVER_FIT_IDS - len(ids))])
            by_dataset[ds.name] = count
    return {"count": sum(by_dataset.values()), "by_dataset": by_dataset, "sample_ids": ids}


def plan_mixture(cfg: MixtureConfig, packing: PackingConfig, steps: int, world_size: int = 1,
                 num_workers: int = 1, seed: int = 42, epoch: int = 0, grad_accum: int = 1) -> dict[str, Any]:
    """Simulate `steps` packs on every (rank, worker) and report realised shares, passes, efficiency
    (per curriculum stage too, when the config has `stages:`)."""
    resolved = resolve_sources(cfg)
    tokenizer = tokenizer_for(resolved)
    groups = resolved.groups
    g_samples = [0] * len(groups)
    g_tokens = [0] * len(groups)
    ds_samples: dict[str, int] = {}
    ds_drawn: dict[tuple[int, str], int] = {}
    tokens_total = packs = 0
    skipped = 0
    n_stages = max(1, len(cfg.stages))
    st_samples = [[0] * len(groups) for _ in range(n_stages)]
    st_tokens = [[0] * len(groups) for _ in range(n_stages)]
    stage_packs = [0] * n_stages
    stream = None
    for rank in range(world_size):
        for worker in range(num_workers):
            stream = MixtureStream(cfg, packing, tokenizer, rank=rank, world_size=world_size, worker_id=worker,
                                   num_workers=num_workers, seed=seed, epoch=epoch, resolved=resolved,
                                   grad_accum=grad_accum)
            log: list = []
            stream.log_draws(log)
            for _ in range(steps):
                plan = stream.next_plan()
                packs += 1
                tokens_total += plan.tokens
                stage = plan.metrics["stage"]
                stage_packs[stage] += 1
                for m in plan.members:
                    g_samples[m.group] += 1
                    g_tokens[m.group] += m.cost
                    st_samples[stage][m.group] += 1
                    st_tokens[stage][m.group] += m.cost
                    ds_samples[m.sample.dataset] = ds_samples.get(m.sample.dataset, 0) + 1
            skipped += sum(stream.stats["skipped_too_long"])
            for d in log:
                key = (d.group, d.sample.dataset)
                ds_drawn[key] = ds_drawn.get(key, 0) + 1
    weights = normalised([g.config.weight for g in groups])
    if cfg.stages:   # the weights in force, averaged over the simulated packs
        per_stage = [normalised(st.weights) for st in cfg.stages]
        weights = [sum(n * w[i] for n, w in zip(stage_packs, per_stage)) / max(1, sum(stage_packs))
                   for i in range(len(groups))]
    n_samples, n_tokens = max(1, sum(g_samples)), max(1, sum(g_tokens))
    out_groups = {}
    for g in groups:
        out_groups[g.name] = {
            "weight": round(weights[g.index], 6), "sample_share": round(g_samples[g.index] / n_samples, 6),
            "token_share": round(g_tokens[g.index] / n_tokens, 6), "samples": g_samples[g.index],
            "tokens": g_tokens[g.index], "mandatory": g.config.is_mandatory, "rows": g.total,
            "datasets": [d.name for d in g.datasets],
        }
    out_datasets: dict[str, dict[str, Any]] = {}
    for g in groups:
        for di, ds in enumerate(g.datasets):
            rows = int(g.block_len[g.block_ds == di].sum())
            entry = out_datasets.setdefault(ds.name, {"rows": 0, "samples": ds_samples.get(ds.name, 0),
                                                      "drawn": 0, "passes": 0.0})
            entry["rows"] += rows
            drawn = ds_drawn.get((g.index, ds.name), 0)
            entry["drawn"] += drawn
            entry["passes"] = round(entry["passes"] + (drawn / rows if rows else 0.0), 6)
    out_stages = []
    for i, stage in enumerate(cfg.stages):
        sw = normalised(stage.weights)
        ns, nt = max(1, sum(st_samples[i])), max(1, sum(st_tokens[i]))
        out_stages.append({
            "name": stage.name, "start_step": stage_start(cfg.stages, i), "until_step": stage.until_step,
            "samples": sum(st_samples[i]),
            "groups": {g.name: {"weight": round(sw[g.index], 6),
                                "sample_share": round(st_samples[i][g.index] / ns, 6),
                                "token_share": round(st_tokens[i][g.index] / nt, 6)} for g in groups}})
    never_fit = never_fit_scan(resolved, packing.max_num_tokens_per_sample, tokenizer)
    never_fit["skipped_in_run"] = skipped
    return {
        "config": str(cfg.path) if cfg.path else None,
        "catalog": str(resolved.catalog.path), "shards": str(resolved.shards_dir),
        "steps": steps, "world_size": world_size, "num_workers": num_workers, "seed": stream.seed if stream else seed,
        "epoch": epoch, "weight_unit": cfg.weight_unit, "packs": packs,
        "packing": {k: getattr(packing, k) for k in ("expected_num_tokens", "max_num_tokens",
                                                     "max_num_tokens_per_sample", "prefer_buffer_before",
                                                     "max_buffer_size")},
        "groups": out_groups, "datasets": out_datasets,
        "packing_efficiency": round(tokens_total / max(1, packs) / packing.max_num_tokens, 6),
        "mean_tokens_per_pack": round(tokens_total / max(1, packs), 1),
        "never_fit": never_fit, "notes": list(resolved.notes),
        "gradient_accumulation_steps": grad_accum,
        "optimizer_steps": -(-steps * num_workers // grad_accum),
        **({"stages": out_stages} if cfg.stages else {}),
    }
