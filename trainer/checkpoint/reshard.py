"""Resuming a checkpoint with another topology (world size W -> W', loader workers K -> K').

* Data: the states of all W x K old streams (every rank's `stream_state.*-of-W.json`) are merged into one
  state (pipelines.mixture.stream.merge_states) that every new (rank, loader slot) loads: the current pass
  of every group continues without repeats or gaps (docs/mixture.md#resume), at the optimizer step the
  checkpoint was taken.
* Optimizer: a shard file per FSDP shard of the old layout. FSDP2 shards every parameter along dim 0 in
  `torch.chunk` pieces, so the old pieces are concatenated back into the full tensor and the new rank's
  piece is cut with the new shard count. DDP saves one full file, which fits any world size.
* Model and EMA weights are saved full (model.safetensors, ema.safetensors): nothing to reshard.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

LOADER_FORMAT = "medloom-loader-v1"   # as trainer/data.py writes it (LoaderState.to_json)
_STREAM_FILE = re.compile(r"stream_state\.(\d{5})-of-(\d{5})\.json$")
_OPT_FILE = re.compile(r"optimizer\.(\d{5})-of-(\d{5})\.pt$")


class TopologyError(ValueError):
    """Old states that cannot be merged; `str()` says why and what to do."""


def saved_stream_files(source: Path) -> dict[int, Path]:
    """rank -> stream state file of the checkpoint (one world size per checkpoint)."""
    out = {}
    for f in source.glob("stream_state.*.json"):
        m = _STREAM_FILE.search(f.name)
        if m:
            out[int(m.group(1))] = f
    return out


def _loader_json(data: Optional[dict]) -> Optional[dict]:
    if data is None or data.get("format") == LOADER_FORMAT:
        return data
    return {"format": LOADER_FORMAT, "num_slots": 1, "next_slot": 0, "states": [data]}   # a bare stream state


def saved_topology(source: Path) -> Optional[tuple[int, int]]:
    """(ranks, loader slots per rank) the checkpoint's data streams ran with, or None without stream states."""
    files = saved_stream_files(source)
    if not files:
        return None
    world = int(_STREAM_FILE.search(next(iter(files.values())).name).group(2))
    data = _loader_json(json.loads(next(iter(files.values())).read_text()))
    return world, int(data["num_slots"]) if data else 1


def merged_loader_state(source: Path, slots: int) -> dict:
    """The loader state (trainer/data.py format) every new rank starts from: `slots` copies of the merge of
    all old streams' states."""
    from pipelines.mixture.stream import StreamStateError, merge_states

    files = saved_stream_files(source)
    world = int(_STREAM_FILE.search(next(iter(files.values())).name).group(2))
    missing = sorted(set(range(world)) - set(files))
    if missing:
        raise TopologyError(f"{source} lacks the stream states of rank(s) {missing} (of {world}); a change of "
                            f"world size needs every old rank's stream_state file")
    states = []
    for rank in range(world):
        data = _loader_json(json.loads(files[rank].read_text()))
        if data is None or any(s is None for s in data["states"]):
            raise TopologyError(f"{files[rank]}: a loader slot had not produced a batch when the checkpoint was "
                                f"taken; resume with the old topology ({world} worker(s), dataloader_workers "
                                f"{data['num_slots'] if data else 1}) or pass --resume_model_only True")
        states += data["states"]
    try:
        merged = merge_states(states)
    except StreamStateError as exc:
        raise TopologyError(f"{source}: {exc}") from None
    return {"format": LOADER_FORMAT, "num_slots": slots, "next_slot": 0, "states": [merged] * slots}


def optimizer_shard_counts(source: Path) -> list[int]:
    """Shard counts of the checkpoint's optimizer files: from its completion marker (which lists files not
    fetched yet from object storage), else from the folder."""
    try:
        names = json.loads((source / "COMPLETE.json").read_text()).get("files", [])
    except (OSError, ValueError):
        names = [f.name for f in source.glob("optimizer.*.pt")]
    return sorted({int(m.group(2)) for m in map(_OPT_FILE.search, names) if m})


def reshard_optimizer(shards: list[dict], index: int, count: int) -> dict:
    """Optimizer state of shard `index` of `count` from the states of all old shards (in shard order):
    tensors with a dim are concatenated along dim 0 and cut into `count` `torch.chunk` pieces (empty pieces
    for ranks past the last); scalars (the step count) come from shard 0."""
    first = shards[0]
    state: dict[Any, dict] = {}
    for key, entry in first["state"].items():
        out = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                full = torch.cat([s["state"][key][name] for s in shards], dim=0)
                pieces = torch.chunk(full, count, dim=0)
                out[name] = pieces[index].clone() if index < len(pieces) else full[:0].clone()
            else:
                out[name] = value
        state[key] = out
    return {"state": state, "param_groups": first["param_groups"]}


def load_resharded_optimizer(source: Path, index: int, count: int,
                             fetch: Optional[Callable[[str], Any]] = None) -> Optional[dict]:
    """This rank's optimizer state rebuilt from shard files of another count, or None if there are none."""
    for old in (c for c in optimizer_shard_counts(source) if c != count):
        names = [f"optimizer.{i:05d}-of-{old:05d}.pt" for i in range(old)]
        for name in names:
            if fetch is not None and not (source / name).is_file():
                fetch(name)
        if all((source / name).is_file() for name in names):
            from trainer.checkpoint.state_files import load_state_file

            shards = [load_state_file(source / name) for name in names]   # data only, never code
            return reshard_optimizer(shards, index, count)
    return None


def topology_note(old: tuple[int, int], new: tuple[int, int]) -> str:
    """What a resume with another topology guarantees (printed at start and at the end of the run)."""
    return (f"resumed a checkpoint of {old[0]} rank(s) x {old[1]} loader worker(s) with {new[0]} x {new[1]}: "
            f"model, EMA, optimizer and LR schedule continue exactly; the data stream continues the current "
            f"pass of every group without repeating or skipping a sample that the old run trained (samples it "
            f"held in its packing buffers are handed out again), at the same optimizer step and curriculum "
            f"stage; mixture draws and pack boundaries from here on differ from what the old topology would "
            f"have produced (docs/mixture.md#resume)")
