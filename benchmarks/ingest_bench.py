#!/usr/bin/env python
"""Ingest throughput: jobs/ingest.py vs a Hugging Face `datasets` script, a plain loop and the read-every-byte
limit, on one synthetic catalog.

    python benchmarks/ingest_bench.py                 # 20,000 records over 1,000 images, drawn at random
    python benchmarks/ingest_bench.py --vqa           # VQA-style: 15,000 records, 10 questions per image
    python benchmarks/ingest_bench.py --records 2000  # a quick run

Generates (once, cached under --workdir) a catalog of `--records` SFT records over a pool of `--pool` distinct
images, 256-2,048 px per side, PNG and JPEG mixed (smooth gradients plus noise), then reports
records/s and MB/s for:
  (a) `python jobs/ingest.py` as a subprocess (what a user runs: includes starting Ray), and the same
      ingest in-process after `ray.init`, twice: (a1) cold Ray workers, (a2) warm workers (the pipeline alone);
  (b) a plain single-process loop doing the same JSON parse, header probe, sha256 and byte copy;
  (c) the read-every-byte limit: reading the JSONL and every referenced image file once (warm cache);
  (d) the embed limit: reading every byte once and writing it once to one file (no parsing, probing,
      hashing or Parquet): the least any ingest that embeds the bytes must do;
  (r) the fixed cost of (a) alone: a Python process that imports Ray, starts it and stops it;
  (p) the peer: what a user writes by hand, a fresh Python process running `datasets.load_dataset("json")`,
      `.map(num_proc=2)` reading each image's bytes and size, `.to_parquet()` (see PEER_SCRIPT).
(a) and (p) run alternately, `--rounds` times each, in one run (the best of each is compared), so a load change
on a shared machine hits both. With `--vqa` the records come `--per-image` at a time per image, in order (as
VQA-RAD, SLAKE and PathVQA are shaped). MB counts the JSONL plus the image bytes each record references (what
an ingest must read); the shard size is compared with the distinct image bytes. The machine's load average is
printed before and after. Targets: --vqa: (a) at least as fast as (p) and shards at most 1.3x the distinct
image bytes; default catalog: (a2) faster than (b). Every random choice flows from --seed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _image(rng: np.random.Generator, width: int, height: int, gray: bool) -> Image.Image:
    """A smooth two-direction gradient (compresses well, still a real multi-KB file)."""
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)
    a, b = rng.uniform(40, 200, size=2)
    base = (np.add.outer(y * a, x * b)).astype(np.uint8)
    if gray:
        return Image.fromarray(base, "L")
    other = (np.add.outer(y * b, (1 - x) * a)).astype(np.uint8)
    return Image.fromarray(np.stack([base, other, base // 2 + 60], axis=-1), "RGB")


PEER_SCRIPT = '''
import sys
from PIL import Image
from datasets import load_dataset

records, images, out, cache = sys.argv[1:5]


def read(example):
    path = images + "/" + example["input_img"][0]["path"]
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(path) as image:
        width, height = image.size
    return {"image_bytes": data, "image_width": width, "image_height": height}


ds = load_dataset("json", data_files=records, split="train", cache_dir=cache)
ds = ds.map(read, num_proc=2)
ds.to_parquet(out)
'''


def generate(workdir: Path, records: int, pool: int, seed: int, per_image: int = 0) -> dict:
    """Write images, JSONL and catalog under workdir (reused when the same parameters are asked again).
    `per_image` > 0: records come in runs of that many questions about one image (VQA-style), else each
    record draws its image at random from the pool."""
    meta_path = workdir / "bench.json"
    wanted = {"records": records, "pool": pool, "seed": seed, "per_image": per_image, "version": 3}
    if meta_path.exists() and json.loads(meta_path.read_text()).get("params") == wanted:
        return json.loads(meta_path.read_text())
    if workdir.exists():
        shutil.rmtree(workdir)
    images = workdir / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    files = []
    started = time.perf_counter()
    for i in range(pool):
        width, height = (int(v) for v in rng.integers(256, 2049, size=2))
        jpeg = bool(rng.integers(0, 2))
        image = _image(rng, width, height, gray=bool(rng.integers(0, 2)) and not jpeg)
        if per_image:   # VQA-style images: noise makes them photo-sized (~250 KB), not a few KB of gradient
            noise = rng.integers(-4, 5, size=(height, width, *(() if image.mode == "L" else (3,))))
            image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8),
                                    image.mode)
        name = f"{i // 100:03d}/img{i:05d}.{'jpg' if jpeg else 'png'}"
        (images / name).parent.mkdir(exist_ok=True)
        if jpeg:
            image.save(images / name, "JPEG", quality=85)
        else:
            image.save(images / name, "PNG", compress_level=6)
        files.append((name, width, height))
    paths = []
    with open(workdir / "records.jsonl", "w") as f:
        for i in range(records):
            name, width, height = files[(i // per_image) % pool] if per_image else files[int(rng.integers(0, pool))]
            paths.append(name)
            f.write(json.dumps({"id": i, "input_img": [{"path": name, "width": width, "height": height}],
                                "message": [{"from": "human", "value": f"<image>\nDescribe finding {i}."},
                                            {"from": "gpt", "value": "A smooth synthetic gradient. " * 3}]}) + "\n")
    (workdir / "catalog.yaml").write_text(
        "output_dir: shards\nmax_reject_fraction: 0.01\ndatasets:\n"
        "  - {name: bench, task: sft, jsonl_path: records.jsonl, data_dir: images}\n")
    meta = {"params": wanted, "paths": paths, "generate_seconds": round(time.perf_counter() - started, 1),
            "pool_bytes": sum((images / n).stat().st_size for n, _, _ in files),
            "distinct_bytes": sum((images / n).stat().st_size for n in set(paths))}
    meta_path.write_text(json.dumps(meta))
    return meta


def read_every_byte(workdir: Path, paths: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    total = len((workdir / "records.jsonl").read_bytes())
    root = workdir / "images"
    for name in paths:
        with open(root / name, "rb") as f:
            total += len(f.read())
    return time.perf_counter() - started, total


def read_and_write_every_byte(workdir: Path, paths: list[str]) -> float:
    """(d): copy the JSONL and every referenced image into one file, written through an 8 MB buffer."""
    started = time.perf_counter()
    root = workdir / "images"
    with tempfile.TemporaryFile(dir=workdir) as out, open(out.fileno(), "wb", buffering=8 << 20, closefd=False) as f:
        f.write((workdir / "records.jsonl").read_bytes())
        for name in paths:
            with open(root / name, "rb") as src:
                f.write(src.read())
        f.flush()
    return time.perf_counter() - started


def ray_start_stop() -> float:
    """(r): what a fresh `jobs/ingest.py` pays before it touches a record: interpreter, Ray import and start."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import ray; ray.init(address=\"local\", include_dashboard=False, log_to_driver=False); "
                    "ray.shutdown()"], check=True, capture_output=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return time.perf_counter() - started


def plain_loop(workdir: Path) -> float:
    """Single process: parse each line, resolve + probe the image header, sha256, copy the bytes out."""
    from pipelines.imaging.medical_hooks import register_medical_imaging
    from pipelines.imaging.probe import probe_image, resolve_image_path

    register_medical_imaging()   # the same format handlers as the ingest

    root = (workdir / "images").resolve()
    started = time.perf_counter()
    with open(workdir / "records.jsonl", "rb") as src, tempfile.TemporaryFile(dir=workdir) as out:
        for line in src:
            record = json.loads(line)
            real, _ = resolve_image_path(root, record["input_img"][0]["path"])
            probe = probe_image(real, 20_000_000)
            out.write(probe.data)
    return time.perf_counter() - started


def ingest_subprocess(workdir: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "ingest.py"), str(workdir / "catalog.yaml"),
                           "--force", "--quiet", "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout)


def peer_subprocess(workdir: Path) -> float:
    """(p): the hand-written `datasets` script as a fresh process, with an empty `datasets` cache."""
    script = workdir / "peer_datasets_script.py"
    script.write_text(PEER_SCRIPT)
    cache, out = workdir / "hf_cache", workdir / "peer.parquet"
    shutil.rmtree(cache, ignore_errors=True)
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), str(workdir / "records.jsonl"), str(workdir / "images"),
                           str(out), str(cache)], capture_output=True, text=True,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the datasets script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    shutil.rmtree(cache, ignore_errors=True)
    return seconds


def ingest_in_process(workdir: Path) -> tuple[float, float]:
    """(first run, second run) with one Ray started beforehand: the second one has warm workers."""
    import ray

    from datasets_catalog.catalog import load_catalog
    from pipelines.ingest.driver import run_ingest

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        catalog = load_catalog(workdir / "catalog.yaml")
        times = []
        for _ in range(2):
            started = time.perf_counter()
            run_ingest(catalog, force=True, progress=False, log=lambda m: None)
            times.append(time.perf_counter() - started)
        return times[0], times[1]
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, help="records (default 20,000; --vqa: 15,000)")
    parser.add_argument("--pool", type=int, help="distinct image files (default 1,000; --vqa: records / per-image)")
    parser.add_argument("--vqa", action="store_true", help="VQA-style catalog: --per-image questions per image")
    parser.add_argument("--per-image", type=int, default=10, help="records per image with --vqa (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs of (a) and (p) (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="default: <tmp>/medloom_ingest_bench[_vqa]")
    parser.add_argument("--keep-shards", action="store_true", help="keep the written shards")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    records = args.records or (15_000 if args.vqa else 20_000)
    per_image = args.per_image if args.vqa else 0
    pool = min(args.pool or (-(-records // per_image) if per_image else 1000), records)
    workdir = args.workdir or Path(tempfile.gettempdir()) / ("medloom_ingest_bench_vqa" if args.vqa
                                                            else "medloom_ingest_bench")
    meta = generate(workdir, records, pool, args.seed, per_image)
    paths = meta["paths"]
    load_before = os.getloadavg()
    read_every_byte(workdir, paths)                     # warm the page cache for everyone
    c_seconds, total_bytes = read_every_byte(workdir, paths)
    d_seconds = min(read_and_write_every_byte(workdir, paths) for _ in range(3))
    r_seconds = ray_start_stop()
    b_seconds = plain_loop(workdir)
    a_runs, p_runs = [], []
    for _ in range(args.rounds):                        # alternated: a load change hits both
        seconds, report = ingest_subprocess(workdir)
        a_runs.append(seconds)
        p_runs.append(peer_subprocess(workdir))
    a_seconds, p_seconds = min(a_runs), min(p_runs)
    a1_seconds, a2_seconds = ingest_in_process(workdir)
    load_after = os.getloadavg()
    manifest = json.loads((workdir / "shards" / "bench" / "_manifest.json").read_text())
    assert manifest["rows_written"] == records, manifest["rejects_by_reason"]
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    peer_bytes = (workdir / "peer.parquet").stat().st_size
    if not args.keep_shards:
        shutil.rmtree(workdir / "shards", ignore_errors=True)
    (workdir / "peer.parquet").unlink(missing_ok=True)

    mb = total_bytes / 1e6
    rows = [("(a) jobs/ingest.py (subprocess, incl. Ray start)", a_seconds),
            ("(p) datasets script (subprocess, map num_proc=2)", p_seconds),
            ("(a1) in-process, Ray started, cold workers", a1_seconds),
            ("(a2) in-process, Ray started, warm workers", a2_seconds),
            ("(b) plain single-process loop", b_seconds),
            ("(c) read every byte once", c_seconds),
            ("(d) read + write every byte once (best of 3)", d_seconds),
            ("(r) python + Ray start/stop only (no records)", r_seconds)]
    results = {
        "machine": f"{os.cpu_count()} CPUs ({os.uname().machine}), {os.uname().sysname}",
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "records": records, "distinct_images": pool, "records_per_image": per_image or None,
        "input_MB": round(mb, 1), "distinct_image_MB": round(meta["distinct_bytes"] / 1e6, 1),
        "shard_MB": round(shard_bytes / 1e6, 1), "peer_parquet_MB": round(peer_bytes / 1e6, 1),
        "shards_vs_distinct_images": round(shard_bytes / meta["distinct_bytes"], 3),
        "a_runs_seconds": [round(v, 2) for v in a_runs], "p_runs_seconds": [round(v, 2) for v in p_runs],
        "runs": {name: {"seconds": round(s, 2), "records_per_s": round(records / s, 1),
                        "MB_per_s": round(mb / s, 1)} for name, s in rows},
        "a_speed_vs_p": round(p_seconds / a_seconds, 3), "a2_speed_vs_b": round(b_seconds / a2_seconds, 3),
        "a_vs_c": round(c_seconds / a_seconds, 3), "a2_vs_c": round(c_seconds / a2_seconds, 3),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {results['machine']}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{records:,} records over {pool:,} distinct images"
          f"{f' ({per_image} per image, in order)' if per_image else ' (drawn at random)'}; {mb:,.1f} MB read per "
          f"pass (JSONL + referenced image bytes); distinct images {meta['distinct_bytes'] / 1e6:,.1f} MB")
    print(f"{'run':52s} {'seconds':>8s} {'records/s':>10s} {'MB/s':>8s}")
    for name, seconds in rows:
        print(f"{name:52s} {seconds:8.2f} {records / seconds:10,.0f} {mb / seconds:8,.1f}")
    print(f"(a) runs {', '.join(f'{v:.2f}' for v in a_runs)} s; (p) runs {', '.join(f'{v:.2f}' for v in p_runs)} s "
          f"(alternated; best of each above)")
    print(f"speed (a) vs (p): {results['a_speed_vs_p']:.2f}x (target >= 1.0 on --vqa); (a2) vs (b): "
          f"{results['a2_speed_vs_b']:.2f}x (target > 1.0 on the default catalog)")
    print(f"shards {shard_bytes / 1e6:,.1f} MB = {results['shards_vs_distinct_images']:.2f}x the distinct image bytes "
          f"(target <= 1.3 on --vqa); the datasets script's Parquet {peer_bytes / 1e6:,.1f} MB")


if __name__ == "__main__":
    main()
