"""Small, valid synthetic catalogs for tests and benchmarks: JSONL + PNG files + shards + `_manifest.json`.

`make_catalog(root, [DatasetRecipe("vqa", "sft", rows=50), ...])` writes, under `root`:

    root/sources/<name>.jsonl          upstream UniMedVL lines (input_img / output_img / message)
    root/sources/<name>/img_*.png      real PNG files the JSONL points at
    root/shards/<name>/part-NNNNN.parquet + _manifest.json   exactly what `jobs/ingest.py` writes
    root/catalog.yaml                  a catalog naming those datasets (output_dir: shards)

and returns the catalog path. Rows follow `pipelines.storage.shard_schema.SHARD_SCHEMA`; resize targets, token
counts and `num_tokens` are computed with the shared code (transforms, plan, tokenizer), so shards are
indistinguishable from ingested ones. `distinct=K` writes only K different records and repeats them with
new `sample_id`s: that is how the benchmarks build 1,000,000-row catalogs in seconds.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datasets_catalog.plan import ImageSlot, ImageTokens, Message, build_plan, packed_length
from datasets_catalog.task_kinds import resolve_task_kind
from datasets_catalog.tokenizer import TextTokenizer
from datasets_catalog.transforms import DEFAULT_VAE_ARGS, DEFAULT_VIT_ARGS, ImageTransformArgs, vae_tokens, vit_tokens
from pipelines.imaging.pixels import resized_pixels
from pipelines.storage.shard_schema import SCHEMA_VERSION, SHARD_SCHEMA
from pipelines.storage.uris import write_text_atomic


@dataclass
class DatasetRecipe:
    name: str
    task: str = "sft"                      # task-kind alias or upstream class name
    rows: int = 20
    distinct: int | None = None            # None: every row is its own record; K: repeat K records
    image_sizes: tuple[int, int] = (24, 80)   # PNG side range in pixels (small: tests stay fast)
    words: tuple[int, int] = (3, 30)          # words per message
    long_every: int = 0                    # every k-th record gets a very long answer (never fits tests)
    long_words: int = 4000
    rows_per_row_group: int = 64
    rows_per_file: int = 256
    embed_bytes: bool = True               # False = `--reference-images` shards (bytes null)
    store_pixels: bool = False             # True = `--store-pixels` shards (decoded, resized pixels)
    image_transform_args: ImageTransformArgs = DEFAULT_VAE_ARGS
    vit_image_transform_args: ImageTransformArgs = DEFAULT_VIT_ARGS
    seed: int = 0
    extra: dict = field(default_factory=dict)


_WORDS = ("lung", "opacity", "left", "right", "lobe", "nodule", "normal", "chest", "image", "shows", "no",
          "effusion", "cardiac", "silhouette", "mild", "consolidation", "view", "frontal", "scan", "axial")


def _png(rng: np.random.Generator, width: int, height: int) -> bytes:
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 64, size=(height, width, 3)).astype(np.float32)
    pixels = np.clip(gradient * 0.7 + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _text(rng: np.random.Generator, lo_hi: tuple[int, int]) -> str:
    n = int(rng.integers(lo_hi[0], lo_hi[1] + 1))
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=n))


def _record(recipe: DatasetRecipe, kind, i: int, rng: np.random.Generator) -> tuple[list[Message], int, int]:
    """(messages, n_input, n_output) of record i for this task kind (shapes of docs/upstream-compat.md#sequence-plans)."""
    answer = _text(rng, recipe.words)
    if recipe.long_every and i % recipe.long_every == recipe.long_every - 1:
        answer = " ".join(_WORDS[j % len(_WORDS)] for j in range(recipe.long_words))
    question = _text(rng, recipe.words)
    name = kind.name
    if name == "text_only":
        return [Message("human", question), Message("gpt", answer)], 0, 0
    if name == "t2i":
        return [Message("human", question)], 0, 1
    if name in ("edit", "counterfactual"):
        return [Message("human", f"<image>\n{question}"), Message("gpt", answer)], 1, 1
    return [Message("human", f"<image>\n{question}"), Message("gpt", answer)], 1, 0


def _image_struct(path: str, data: bytes | None, width: int, height: int, vae: ImageTransformArgs,
                  vit: ImageTransformArgs, img_num: int, pixels_of: bytes | None = None) -> dict:
    """`pixels_of`: the image's bytes when the decoded, resized pixels are stored too (store_pixels)."""
    vw, vh = vae.target_size(width, height)
    tw, th = vit.target_size(width, height, img_num)
    pixels = resized_pixels(pixels_of, None, None, {"vae": (vw, vh), "vit": (tw, th)}) if pixels_of else {}
    return {**pixels, "path": path, "width": width, "height": height, "format": "PNG",
            "vae_width": vw, "vae_height": vh, "vae_tokens": vae_tokens(vw, vh),
            "vit_width": tw, "vit_height": th, "vit_tokens": vit_tokens(tw, th),
            "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
            "bytes": data, "meta": None}


def row_tokens(kind, messages: list[Message], inputs: list[dict], outputs: list[dict],
               tokenizer: TextTokenizer) -> tuple[int, int]:
    """(text_tokens, num_tokens) the way ingest counts them."""
    plan = build_plan(kind, messages, len(inputs), len(outputs))
    texts = [len(tokenizer.encode(item.text)) for item in plan.items if item.type == "text"]
    images = {ImageSlot("input", j): ImageTokens(im["vae_tokens"], im["vit_tokens"]) for j, im in enumerate(inputs)}
    images.update({ImageSlot("output", j): ImageTokens(im["vae_tokens"], im["vit_tokens"])
                   for j, im in enumerate(outputs)})
    return sum(texts), packed_length(plan, texts, images)


def make_dataset(root: Path, recipe: DatasetRecipe, tokenizer: TextTokenizer | None = None,
                 shards_dir: Path | None = None) -> Path:
    """Write sources and shards of one dataset; returns its shard folder."""
    tokenizer = tokenizer or TextTokenizer.builtin()
    kind = resolve_task_kind(recipe.task)
    rng = np.random.default_rng(recipe.seed + 7919 * sum(recipe.name.encode()))
    src_dir = root / "sources" / recipe.name
    src_dir.mkdir(parents=True, exist_ok=True)
    out = (shards_dir or root / "shards") / recipe.name
    out.mkdir(parents=True, exist_ok=True)
    distinct = min(recipe.rows, recipe.distinct or recipe.rows)

    templates: list[dict] = []
    jsonl_lines: list[str] = []
    n_images = 0
    for i in range(distinct):
        messages, n_in, n_out = _record(recipe, kind, i, rng)
        structs: dict[str, list[dict]] = {"input": [], "output": []}
        for role, count in (("input", n_in), ("output", n_out)):
            for j in range(count):
                w, h = (int(v) for v in rng.integers(recipe.image_sizes[0], recipe.image_sizes[1] + 1, size=2))
                data = _png(rng, w, h)
                rel = f"img_{i:07d}_{role}{j}.png"
                (src_dir / rel).write_bytes(data)
                img_num = n_in if kind.vit_img_num_is_image_count else 1
                structs[role].append(_image_struct(rel, data if recipe.embed_bytes else None, w, h,
                                                   recipe.image_transform_args, recipe.vit_image_transform_args,
                                                   img_num, data if recipe.store_pixels else None))
                n_images += 1
        text_tokens, num_tokens = row_tokens(kind, messages, structs["input"], structs["output"], tokenizer)
        templates.append({
            "messages": [{"from": m.role, "value": m.value} for m in messages],
            "input_images": structs["input"], "output_images": structs["output"],
            "text_tokens": text_tokens, "num_tokens": num_tokens,
        })
        line = {"message": [{"from": m.role, "value": m.value} for m in messages], **recipe.extra}
        if n_in:
            line["input_img"] = [{"path": s["path"], "width": s["width"], "height": s["height"]}
                                 for s in structs["input"]]
        if n_out:
            line["output_img"] = [{"path": s["path"], "width": s["width"], "height": s["height"]}
                                  for s in structs["output"]]
        jsonl_lines.append(json.dumps(line))
    jsonl = root / "sources" / f"{recipe.name}.jsonl"
    jsonl.write_text("\n".join(jsonl_lines) + "\n")

    template_table = pa.Table.from_pylist(
        [{"sample_id": "", "dataset": recipe.name, "task": kind.name, "line_number": 0, "extra": None, **t}
         for t in templates], schema=SHARD_SCHEMA)
    shards = []
    for file_index, start in enumerate(range(0, recipe.rows, recipe.rows_per_file)):
        stop = min(recipe.rows, start + recipe.rows_per_file)
        rows = np.arange(start, stop)
        table = template_table.take(pa.array(rows % distinct))
        table = table.set_column(0, "sample_id", pa.array([f"{recipe.name}:{r + 1}" for r in rows], pa.string()))
        table = table.set_column(3, "line_number", pa.array(rows + 1, pa.int64()))
        name = f"part-{file_index:05d}.parquet"
        tmp = out / (name + ".tmp")
        pq.write_table(table, tmp, row_group_size=recipe.rows_per_row_group)
        tmp.replace(out / name)
        shards.append({"file": name, "rows": int(stop - start), "bytes": (out / name).stat().st_size})
    manifest = {
        "dataset": recipe.name, "task": kind.name, "rows_read": recipe.rows, "rows_written": recipe.rows,
        "rows_rejected": 0, "images": n_images * (recipe.rows // max(distinct, 1)),
        "source": {"path": str(jsonl.resolve()), "size": jsonl.stat().st_size,
                   "sha256": hashlib.sha256(jsonl.read_bytes()).hexdigest()},
        "transforms": {"image_transform_args": recipe.image_transform_args.to_dict(),
                       "vit_image_transform_args": recipe.vit_image_transform_args.to_dict()},
        "tokenizer": tokenizer.name, "schema_version": SCHEMA_VERSION, "shards": shards,
        "data_dir": str(src_dir.resolve()), "split": "train", "modality": "xray", "catalog": None,
        "settings": {"store_pixels": True} if recipe.store_pixels else {},
    }
    write_text_atomic(out / "_manifest.json", json.dumps(manifest, indent=2))
    return out


def make_catalog(root: str | Path, recipes: list[DatasetRecipe], tokenizer: TextTokenizer | None = None,
                 write_shards: bool = True) -> Path:
    """Write a catalog (sources, shards, catalog.yaml) for these recipes; returns the catalog path."""
    import yaml

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or TextTokenizer.builtin()
    entries = []
    for recipe in recipes:
        if write_shards:
            make_dataset(root, recipe, tokenizer)
        else:
            (root / "sources" / recipe.name).mkdir(parents=True, exist_ok=True)
            (root / "sources" / f"{recipe.name}.jsonl").write_text("{}\n")
        entries.append({"name": recipe.name, "task": recipe.task, "jsonl_path": f"sources/{recipe.name}.jsonl",
                        "data_dir": f"sources/{recipe.name}",
                        "image_transform_args": recipe.image_transform_args.to_dict(),
                        "vit_image_transform_args": recipe.vit_image_transform_args.to_dict()})
    path = root / "catalog.yaml"
    write_text_atomic(path, yaml.safe_dump({"output_dir": "shards", "datasets": entries}, sort_keys=False))
    return path


# Tiny transforms: a few ViT/VAE tokens per image, so packs of ~1k tokens hold several samples.
TINY_VAE = ImageTransformArgs(max_image_size=64, min_image_size=32, image_stride=16)
TINY_VIT = ImageTransformArgs(max_image_size=56, min_image_size=28, image_stride=14, max_pixels=56 * 56)


def tiny(name: str, task: str, rows: int, **kw) -> DatasetRecipe:
    """A recipe with tiny transforms and small row groups (8 rows, 32 per file): blocks and windows matter."""
    kw.setdefault("rows_per_row_group", 8)
    kw.setdefault("rows_per_file", 32)
    return DatasetRecipe(name, task, rows=rows, image_transform_args=TINY_VAE, vit_image_transform_args=TINY_VIT,
                         **kw)


def write_config(path: str | Path, text: str) -> Path:
    """Write a mixture config (YAML text) atomically; returns its path."""
    path = Path(path)
    write_text_atomic(path, text)
    return path


def write_mixture(root: Path) -> Path:
    """A synthetic catalog (VQA, T2I, text-only shards) and a mixture config with a tiny-model train: section
    (the trainer tests' mixture: a few steps of the tiny model on it take seconds)."""
    catalog = make_catalog(root, [tiny("vqa", "sft", rows=24, seed=1), tiny("gen", "t2i", rows=16, seed=2),
                                  tiny("txt", "text_only", rows=16, seed=3)])
    return write_config(root / "mix.yaml", f"""
catalog: {catalog}
sft: {{dataset_names: [vqa], weight: 2}}
t2i: {{dataset_names: [gen], weight: 1}}
text_only: {{dataset_names: [txt], weight: 1}}
train:
  model: tiny
  from_scratch: true
  warmup_steps: 2
  lr: 1.0e-3
  ema: 0.9
  log_every: 1
  expected_num_tokens: 384
  max_num_tokens: 640
  max_num_tokens_per_sample: 384
  prefer_buffer_before: 192
  deterministic: true
""")
