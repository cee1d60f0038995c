#!/usr/bin/env python
"""Loader benchmark: the mixture stream over shards against an upstream-style loader, in one run.

    python benchmarks/loader_bench.py [--rows 400] [--seconds 60] [--rounds 6] [--threads 2] [--big-rows 1000000]
                                      [--work DIR] [--skip-memory] [--skip-pixels] [--json]
    python benchmarks/loader_bench.py --draft-diff      # JPEG draft decoding: pixel difference and speed

1. Throughput (packed tokens/s, one process): a three-dataset mixture (sft, edit, t2i; real PNGs) read by
   `MixtureStream` from shards, against a baseline doing what upstream UniMedVL does: the whole JSONL in
   memory, a seeded shuffle, `json.loads` per sample, open and decode each image file per sample (also for
   samples the packer then drops), tokenise to count tokens, the upstream PackedDataset loop (overflow
   dropped), and the same tensor building (`build_packed_batch`: same transforms, same packing settings).
   Our stream runs sequential (`iter(stream)`) and with threaded look-ahead (`stream.batches(threads)`), each
   over shards holding the original image bytes (decoded per sample, like the baseline) and over
   `--store-pixels` shards of the same records (decoded and resized once at ingest; pipelines.imaging.pixels).
   The loaders alternate in slices; wall time and process CPU time (all threads) of a slice are charged to
   its loader, and the look-ahead is finished inside our own slice (never runs in the baseline's).
2. Time to first batch and peak RSS, each in a fresh process: full stream (sequential) on 10,000- and
   1,000,000-row catalogs, the 2-thread look-ahead on the 1,000,000-row one, and metadata-only packs
   (`next_plan`) on both (RSS must not grow with rows).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from datasets_catalog.task_kinds import resolve_task_kind
from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import ImageTransformArgs
from pipelines.mixture.recompute import recompute_row
from pipelines.packing.config import PackingConfig
from pipelines.packing.sample import StreamSample

VAE = ImageTransformArgs(max_image_size=512, min_image_size=256, image_stride=16)
VIT = ImageTransformArgs(max_image_size=378, min_image_size=224, image_stride=14, max_pixels=378 * 378)
PACKING = PackingConfig(expected_num_tokens=8192, max_num_tokens=10240, max_num_tokens_per_sample=8192,
                        prefer_buffer_before=4096, max_buffer_size=50)
DATASETS = [("vqa", "sft", 2.0), ("edit", "edit", 1.0), ("t2i", "t2i", 1.0)]


def rss_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_catalog(root: Path, rows: int, distinct: int | None, embed: bool = True, image_sizes=(128, 512),
                  store_pixels: bool = False) -> Path:
    """Shards as ingest writes them; `store_pixels`: also the decoded, resized pixels (`--store-pixels`),
    in smaller row groups (a row then carries ~1-2 MB of pixels). Same seeds: same records either way."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))        # tests/helpers/shard_factory.py (tests/ is not an installed package)
    from tests.helpers.shard_factory import DatasetRecipe, make_catalog

    rows_per_group = 16 if store_pixels else 64 if rows < 100_000 else 1000
    recipes = [DatasetRecipe(name, task, rows=rows, distinct=distinct, image_sizes=image_sizes,
                             rows_per_row_group=rows_per_group, store_pixels=store_pixels,
                             rows_per_file=512 if rows < 100_000 else 100_000, embed_bytes=embed,
                             image_transform_args=VAE, vit_image_transform_args=VIT, words=(10, 60))
               for name, task, _ in DATASETS]
    catalog = make_catalog(root, recipes)
    body = [f"catalog: {catalog}"] + [f"{task}: {{dataset_names: [{name}], weight: {w}}}" for name, task, w in DATASETS]
    (root / "mix.yaml").write_text("\n".join(body) + "\n")
    return root / "mix.yaml"


# -- ours ----------------------------------------------------------------------------------------------
class Ours:
    """The mixture stream; `threads=0`: sequential (`iter(stream)`), else `stream.batches(threads)`."""

    def __init__(self, config: Path, threads: int = 0, lookahead: int | None = None) -> None:
        from pipelines.mixture.stream import MixtureStream
        from pipelines.mixture.config import MixtureConfig

        t0 = time.perf_counter()
        self.stream = MixtureStream(MixtureConfig.from_yaml(config), PACKING, TextTokenizer.builtin(), seed=1)
        self.open_s = time.perf_counter() - t0
        self.threads = threads
        self.split = {"decide_s": 0.0, "read_rows_s": 0.0, "build_tensors_s": 0.0}
        self.prefetch = self.stream.batches(threads=threads, lookahead=lookahead) if threads else None

    def pause(self) -> None:
        """End of a time slice: finish the look-ahead already started, so that no work of ours runs in the
        baseline's slice (its packs are counted when consumed, in a later slice: conservative for us)."""
        if self.prefetch is not None:
            self.prefetch.wait_idle()

    def __iter__(self):
        if self.prefetch is not None:   # time split not separable across threads: CPU time is reported
            yield from self.prefetch
            return
        while True:
            a = time.perf_counter()
            plan = self.stream.next_plan()
            b = time.perf_counter()
            samples = [self.stream.full_sample(d) for d in plan.members]
            c = time.perf_counter()
            batch = self.stream.build_batch(plan, samples)
            d = time.perf_counter()
            self.split["decide_s"] += b - a
            self.split["read_rows_s"] += c - b
            self.split["build_tensors_s"] += d - c
            yield batch


def compare(config: Path, root: Path, seconds: float, rounds: int, threads: int = 0,
            pixels_config: Path | None = None) -> dict:
    """Alternate the loaders in `rounds` slices so that load drift on a shared machine hits all of them.

    Loaders: the baseline; our stream sequential and (threads > 0) with threaded look-ahead, over shards
    with the original image bytes; and the same two over `--store-pixels` shards of the same records
    (`pixels_config`). Wall time and process CPU time (all threads) are charged to the loader whose slice it is.
    """
    loaders: dict[str, object] = {}
    iters: dict[str, object] = {}
    totals: dict[str, list[float]] = {}
    first_s: dict[str, float] = {}
    variants = {"ours": (config, 0)}
    if threads:
        variants["ours_threads"] = (config, threads)
    if pixels_config is not None:
        variants["pixels"] = (pixels_config, 0)
        if threads:
            variants["pixels_threads"] = (pixels_config, threads)
    names = [*variants, "baseline"]
    for name in names:
        t, c = time.perf_counter(), time.process_time()
        if name == "baseline":
            loaders[name] = UpstreamBaseline(root, TextTokenizer.builtin())
        else:
            loaders[name] = Ours(*variants[name])
        iters[name] = iter(loaders[name])
        first = next(iters[name])
        first_s[name] = time.perf_counter() - t
        if hasattr(loaders[name], "pause"):
            loaders[name].pause()
        totals[name] = [first.sequence_length, first_s[name], 1, time.process_time() - c]
    gc.collect()
    gc.freeze()   # setup objects (configs, footers, JSONL lines) are long-lived: keep the GC off them
    for _ in range(rounds):
        for name in names:
            it = iters[name]
            start, cpu = time.perf_counter(), time.process_time()
            while time.perf_counter() - start < seconds / rounds:
                totals[name][0] += next(it).sequence_length
                totals[name][2] += 1
            if hasattr(loaders[name], "pause"):
                loaders[name].pause()
            totals[name][1] += time.perf_counter() - start
            totals[name][3] += time.process_time() - cpu
    out = {}
    for name, (tokens, secs, packs, cpu) in totals.items():
        out[name] = {"packs": packs, "tokens": tokens, "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2),
                     "tokens_per_s": tokens / secs, "tokens_per_cpu_s": tokens / cpu, "first_batch_s": first_s[name]}
    for name, (_, n_threads) in variants.items():
        out[name]["time_split"] = ({"threads": n_threads, "lookahead": loaders[name].prefetch.lookahead}
                                   if n_threads else {k: round(v, 2) for k, v in loaders[name].split.items()})
    base = loaders["baseline"]
    out["baseline"]["time_split"] = {"read_decode_count_s": round(base.prep_s, 2),
                                     "build_tensors_s": round(base.build_s, 2)}
    return out


# -- the upstream-style baseline ------------------------------------------------------------------------
class UpstreamBaseline:
    """Per-sample JSONL parsing and image decoding from files, upstream PackedDataset loop (drops)."""

    def __init__(self, root: Path, tokenizer: TextTokenizer, seed: int = 1) -> None:
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.sources = []
        for name, task, weight in DATASETS:
            lines = (root / "sources" / f"{name}.jsonl").read_text().splitlines()   # whole file in memory
            order = list(range(len(lines)))
            self.rng.shuffle(order)
            self.sources.append({"name": name, "kind": resolve_task_kind(task), "lines": lines, "order": order,
                                 "pos": 0, "weight": weight, "data_dir": root / "sources" / name})
        total = sum(s["weight"] for s in self.sources)
        self.cum = []
        acc = 0.0
        for s in self.sources:
            acc += s["weight"] / total
            self.cum.append(acc)
        self.draws = 0
        self.prep_s = 0.0       # JSON + open/decode + token counting, per sample (the loader's own work)
        self.build_s = 0.0

    def _next_sample(self) -> StreamSample:
        from pipelines.imaging.decode import load_image_rgb

        t0 = time.perf_counter()
        u = self.rng.random()
        src = self.sources[next(i for i, c in enumerate(self.cum) if u < c)]
        if src["pos"] >= len(src["order"]):
            self.rng.shuffle(src["order"])
            src["pos"] = 0
        line = src["lines"][src["order"][src["pos"]]]
        src["pos"] += 1
        record = json.loads(line)
        structs = {}
        decoded = {}
        for role, key in (("input", "input_img"), ("output", "output_img")):
            structs[role] = []
            for im in record.get(key, []):
                path = src["data_dir"] / im["path"].lstrip("/")
                image = load_image_rgb(None, path)            # open + decode every sample's images
                decoded[str(path)] = image
                w, h = image.size
                structs[role].append({"path": im["path"], "width": w, "height": h, "bytes": None, "meta": None,
                                      "format": "PNG"})
        # resize targets, plan, tokenisation and packed length: the same rule ingest applies
        row = recompute_row({"messages": record["message"], "input_images": structs["input"],
                             "output_images": structs["output"]}, src["kind"], VAE, VIT, self.tok)
        row["_decoded"] = decoded
        num_tokens = row["num_tokens"]
        self.draws += 1
        self.prep_s += time.perf_counter() - t0
        return StreamSample(f"{src['name']}:{self.draws}", src["name"], src["name"], src["kind"].name, num_tokens,
                            row, str(src["data_dir"]), self.draws)

    def __iter__(self):
        """Upstream PackedDataset iteration (docs/upstream-compat.md#pack-membership), overflow dropped when the buffer is full."""
        import pipelines.packing.packer as packing

        real = packing.load_image_rgb
        current: dict[str, object] = {}
        packing.load_image_rgb = lambda data, path, meta=None, **kw: current.get(str(path)) or real(data, path, meta, **kw)
        try:
            buffer: list[StreamSample] = []
            while True:
                pack, curr = [], 0
                while True:
                    from_buffer = bool(buffer) and curr < PACKING.prefer_buffer_before
                    s = buffer.pop(0) if from_buffer else self._next_sample()
                    if s.num_tokens > PACKING.max_num_tokens_per_sample:
                        continue
                    if curr + s.num_tokens > PACKING.max_num_tokens:
                        if not from_buffer and len(buffer) < PACKING.max_buffer_size:
                            buffer.append(s)
                            continue
                        break                                   # upstream: yield, drop this sample
                    pack.append(s)
                    curr += s.num_tokens
                    if curr >= PACKING.expected_num_tokens:
                        break
                current.clear()
                for s in pack:   # the images this sample decoded when it was read (upstream: at read time)
                    current.update(s.row["_decoded"])
                t0 = time.perf_counter()
                batch = packing.build_packed_batch(pack, PACKING, self.tok, 1)
                self.build_s += time.perf_counter() - t0
                yield batch
        finally:
            packing.load_image_rgb = real


# -- JPEG draft: pixel difference and speed (PackingConfig.jpeg_draft) -------------------------------------
def draft_diff() -> list[dict]:
    """Full decode + bicubic resize vs JPEG draft decode + the same resize, on smooth synthetic photos with
    edges and noise (JPEG q90), default transforms; differences in 0-255 pixel units. Bicubic vs bilinear
    resize of the full decode is printed as a yardstick for 'resize noise'."""
    import io

    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFilter

    from datasets_catalog.transforms import DEFAULT_VAE_ARGS, DEFAULT_VIT_ARGS
    from pipelines.imaging.decode import image_to_tensor, load_image_rgb

    def photo(w: int, h: int, seed: int) -> bytes:
        r = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = 128 + 60 * np.sin(xx / w * 6 + seed) * np.cos(yy / h * 4)
        img = Image.fromarray(np.clip(np.stack([base, base * 0.9 + 10, base * 0.8 + 20], -1), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(25):
            x0, y0, s = int(r.integers(0, w)), int(r.integers(0, h)), int(r.integers(10, max(11, w // 5)))
            draw.ellipse([x0, y0, x0 + s, y0 + s], fill=tuple(int(v) for v in r.integers(0, 255, 3)))
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5))).astype(np.float32) + r.normal(0, 6, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    rows = []
    for w, h in [(600, 600), (1024, 1024), (2048, 1536), (2500, 2048), (3000, 3000)]:
        data = photo(w, h, w)
        for name, targs in (("vae", DEFAULT_VAE_ARGS), ("vit", DEFAULT_VIT_ARGS)):
            tw, th = targs.target_size(w, h)
            full_t, draft_t = [], []
            for _ in range(3):
                t = time.perf_counter()
                full = image_to_tensor(load_image_rgb(data, None), tw, th)
                full_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                small = load_image_rgb(data, None, draft_size=(tw, th))
                drafted = image_to_tensor(small, tw, th)
                draft_t.append(time.perf_counter() - t)
            d = (full - drafted).abs().flatten() * 127.5
            src = load_image_rgb(data, None)
            bil = np.asarray(src.resize((tw, th), Image.Resampling.BILINEAR), dtype=np.float32)
            bic = np.asarray(src.resize((tw, th), Image.Resampling.BICUBIC), dtype=np.float32)
            rows.append({"source": f"{w}x{h}", "target": f"{name} {tw}x{th}", "dct_scale": f"1/{w // small.size[0]}",
                         "max_abs": float(d.max()), "mean_abs": float(d.mean()),
                         "p99_9": float(torch.quantile(d[:1_000_000], 0.999)),
                         "full_ms": min(full_t) * 1000, "draft_ms": min(draft_t) * 1000,
                         "bicubic_vs_bilinear_max": float(np.abs(bil - bic).max()),
                         "bicubic_vs_bilinear_mean": float(np.abs(bil - bic).mean())})
    return rows


# -- memory and first batch, in fresh processes ------------------------------------------------------
def child(mode: str, config: str, packs: int) -> None:
    import torch

    import pipelines.packing.packer  # noqa: F401  (as in a trainer: torch is already imported)

    torch.set_num_threads(1)
    from pipelines.mixture.stream import MixtureStream
    from pipelines.mixture.config import MixtureConfig

    import pyarrow.parquet  # noqa: F401

    rss_imports = rss_mb()
    t0 = time.perf_counter()
    stream = MixtureStream(MixtureConfig.from_yaml(config), PACKING, TextTokenizer.builtin(), seed=1)
    t_open = time.perf_counter() - t0
    if mode == "threads":   # first batch through the threaded look-ahead (2 threads)
        it = stream.batches(threads=2)
        next(it)
        first = time.perf_counter() - t0
        for _ in range(packs - 1):
            next(it)
        it.close()
        print(json.dumps({"first_batch_s": first, "open_s": t_open, "first_plan_s": float("nan"),
                          "peak_rss_mb": rss_mb(), "rss_after_imports_mb": rss_imports, "packs": packs}))
        return
    plan = stream.next_plan()
    t_plan = time.perf_counter() - t0
    if mode == "full":
        stream.materialise(plan)
    first = time.perf_counter() - t0
    for _ in range(packs - 1):
        plan = stream.next_plan()
        if mode == "full":
            stream.materialise(plan)
    print(json.dumps({"first_batch_s": first, "open_s": t_open, "first_plan_s": t_plan,
                      "peak_rss_mb": rss_mb(), "rss_after_imports_mb": rss_imports, "packs": packs}))


def run_child(mode: str, config: Path, packs: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(config), "--packs", str(packs)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=400, help="rows per dataset for the throughput run")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per loader")
    p.add_argument("--rounds", type=int, default=6, help="alternating slices per loader (load drift)")
    p.add_argument("--big-rows", type=int, default=1_000_000, help="rows of the large metadata-only catalog")
    p.add_argument("--threads", type=int, default=2,
                   help="also run the stream with this many look-ahead build threads (0: sequential only)")
    p.add_argument("--skip-memory", action="store_true", help="throughput only (no RSS / first-batch children)")
    p.add_argument("--skip-pixels", action="store_true", help="do not run the stream over --store-pixels shards")
    p.add_argument("--draft-diff", action="store_true",
                   help="only measure JPEG draft decoding (PackingConfig.jpeg_draft): pixel difference and speed")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("MODE", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--packs", type=int, default=20, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.packs)
        return 0
    if args.draft_diff:
        rows = draft_diff()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'source':<10} {'target':<14} {'scale':>5} {'max':>5} {'mean':>6} {'p99.9':>6} {'full ms':>8} "
                  f"{'draft ms':>8}   bicubic vs bilinear max/mean (0-255 units)")
            for r in rows:
                print(f"{r['source']:<10} {r['target']:<14} {r['dct_scale']:>5} {r['max_abs']:5.0f} {r['mean_abs']:6.2f} "
                      f"{r['p99_9']:6.1f} {r['full_ms']:8.1f} {r['draft_ms']:8.1f}   "
                      f"{r['bicubic_vs_bilinear_max']:.0f}/{r['bicubic_vs_bilinear_mean']:.2f}")
        return 0
    if args.build:
        work = Path(args.build)
        if not all((work / name / "mix.yaml").exists() for name in ("throughput", "pixels", "rows10k", "rows1m")):
            build_catalog(work / "throughput", args.rows, min(args.rows, 150))
            build_catalog(work / "pixels", args.rows, min(args.rows, 150), store_pixels=True)
            build_catalog(work / "rows10k", 10_000 // len(DATASETS) + 1, 50, image_sizes=(32, 96))
            build_catalog(work / "rows1m", args.big_rows // len(DATASETS) + 1, 50, embed=False, image_sizes=(32, 96))
        return 0
    import torch

    import pipelines.packing.packer  # noqa: F401  (torch import: paid by the trainer anyway, not by the loaders)

    torch.set_num_threads(1)   # as in a loader worker process; also steadier timings on a shared machine

    work = Path(args.work or tempfile.mkdtemp(prefix="loader_bench_"))
    t = time.perf_counter()
    # built in a separate process: a 1M-row build leaves a large heap behind that slows what runs after it
    subprocess.run([sys.executable, __file__, "--build", str(work), "--rows", str(args.rows),
                    "--big-rows", str(args.big_rows)], check=True)
    small, mid, big = (work / "throughput" / "mix.yaml", work / "rows10k" / "mix.yaml", work / "rows1m" / "mix.yaml")
    setup = time.perf_counter() - t
    load_before = os.getloadavg()
    pixels = None if args.skip_pixels else work / "pixels" / "mix.yaml"
    both = compare(small, small.parent, args.seconds, args.rounds, args.threads, pixels)
    load_after = os.getloadavg()
    base = both["baseline"]
    memory = {} if args.skip_memory else {
        "full_10k": run_child("full", mid, 20), "full_1m": run_child("full", big, 20),
        "threads_1m": run_child("threads", big, 20),
        "meta_10k": run_child("meta", mid, 200), "meta_1m": run_child("meta", big, 200)}
    ratios = {name: both[name]["tokens_per_s"] / base["tokens_per_s"] for name in both if name != "baseline"}
    cpu_ratios = {name: both[name]["tokens_per_cpu_s"] / base["tokens_per_cpu_s"] for name in both
                  if name != "baseline"}
    result = {"machine": f"{os.cpu_count()} CPU(s), {sys.platform}", "setup_s": round(setup, 1),
              "load_average": {"before": [round(x, 2) for x in load_before],
                               "after": [round(x, 2) for x in load_after]},
              "packing": PACKING.to_dict(), **both, "throughput_ratio": max(ratios.values()),
              "throughput_ratios": ratios, "cpu_efficiency_ratios": cpu_ratios, "memory": memory}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"machine: {result['machine']}; load average (1/5/15 min) {result['load_average']['before']} "
              f"before, {result['load_average']['after']} after; synthetic catalogs built in {setup:.1f} s "
              f"under {work}")
        print(f"{'loader':<34} {'packs':>6} {'tokens/s':>10} {'tokens/CPU-s':>13} {'first batch s':>14}")
        labels = {"ours": "mixture stream (sequential)", "ours_threads": f"mixture stream ({args.threads} threads)",
                  "pixels": "stream, --store-pixels shards", "pixels_threads": f"same, {args.threads} threads",
                  "baseline": "upstream-style baseline"}
        for name, r in both.items():
            print(f"{labels[name]:<34} {r['packs']:>6} {r['tokens_per_s']:>10.0f} {r['tokens_per_cpu_s']:>13.0f} "
                  f"{r['first_batch_s']:>14.2f}   {r['time_split']}")
        for name in ratios:
            print(f"ratio {labels[name]} / baseline: {ratios[name]:.2f}x tokens/s, "
                  f"{cpu_ratios[name]:.2f}x tokens per CPU-second")
        for k, m in memory.items():
            print(f"{k:<10} first batch {m['first_batch_s']:.2f} s (open {m['open_s']:.2f} s, first pack decided "
                  f"{m['first_plan_s']:.2f} s), peak RSS {m['peak_rss_mb']:.0f} MB (imports alone "
                  f"{m['rss_after_imports_mb']:.0f} MB; {m['packs']} packs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
