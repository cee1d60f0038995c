"""Trainer checkpoints on object storage (trainer.checkpoint.remote): mirror and restore, an interrupted
upload is never resumed from, sealing and rotation rules."""
from __future__ import annotations

import pytest

from pipelines.storage import uris as storage


def _local_checkpoint(root, step: int):
    """A real trainer checkpoint directory (trainer.checkpoint.local: temp dir, files, marker, rename)."""
    import torch

    from trainer.checkpoint import local as ck

    tmp = ck.prepare_temp(root, step)
    ck.save_safetensors({"w": torch.full((2, 2), float(step))}, tmp / ck.MODEL_FILE)
    ck.save_safetensors({"w": torch.zeros(2, 2)}, tmp / ck.EMA_FILE)
    ck.write_json(tmp / ck.stream_state_file(0, 1), {"step": step})
    return ck.finalize(root, step, [ck.MODEL_FILE, ck.EMA_FILE, ck.stream_state_file(0, 1)])


def test_checkpoints_round_trip_through_s3(bucket, tmp_path, monkeypatch):
    from trainer.checkpoint import local as ck
    from trainer.checkpoint import remote as sc

    remote = sc.remote_checkpoint_root(str(bucket / "runs"), "mix")
    assert remote == bucket / "runs" / "mix" / "checkpoints" and sc.remote_checkpoint_root("runs", "mix") is None
    local = tmp_path / "node_a" / "checkpoints"
    for step in (2, 4, 6):
        sc.mirror_checkpoint(_local_checkpoint(local, step), remote, keep=2)
    assert [s for s, _ in sc.remote_steps(remote)] == [4, 6]
    assert all(sc.remote_is_complete(p) for _, p in sc.remote_steps(remote))

    # an upload that dies before its marker leaves an incomplete step 8 that nobody resumes from
    real_copy = storage.copy_file

    def dying_copy(src, dst):
        if dst.name == ck.MODEL_FILE:
            raise OSError("connection reset (simulated)")
        real_copy(src, dst)

    monkeypatch.setattr(storage, "copy_file", dying_copy)
    with pytest.raises(OSError):
        sc.mirror_checkpoint(_local_checkpoint(local, 8), remote, keep=2)
    monkeypatch.setattr(storage, "copy_file", real_copy)
    assert (remote / "0000008").is_dir() and not sc.remote_is_complete(remote / "0000008")
    assert sc.newest_remote_complete(remote) == remote / "0000006"

    # a fresh machine restores the newest complete checkpoint; the trainer's own rules accept it
    other = tmp_path / "node_b" / "checkpoints"
    restored = sc.restore_newest(remote, other)
    assert restored == other / "0000006" and ck.newest_complete(other) == restored
    assert ck.load_safetensors(restored / ck.MODEL_FILE)["w"][0, 0].item() == 6.0
    assert sc.restore_newest(remote, other) is None            # nothing newer: no second download


def test_remote_seal_and_rotation_rules(bucket, tmp_path):
    """seal_remote refuses (no marker) while a listed file is missing; rotation counts complete checkpoints
    only, never touches a newer incomplete one, and drops dead incomplete ones older than the newest."""
    from trainer.checkpoint import remote as sc

    root = bucket / "ckpts"
    staged = tmp_path / "stage"
    staged.mkdir()
    for name in ("model.safetensors", "stream_state.00000-of-00002.json", "stream_state.00001-of-00002.json"):
        (staged / name).write_bytes(name.encode())
    files = ["model.safetensors", "stream_state.00000-of-00002.json", "stream_state.00001-of-00002.json"]

    def save(step: int, ranks=(0, 1)) -> None:
        d = root / f"{step:07d}"
        save_id = sc.begin_remote_save(d)
        sc.upload_files(staged, ["model.safetensors"] + [files[1 + r] for r in ranks], d)
        sc.seal_remote(d, files, {"step": step, "save_id": save_id})

    with pytest.raises(ValueError, match="marker"):
        sc.upload_files(staged, [sc.MARKER], root / "0000001")
    save(1)
    with pytest.raises(RuntimeError, match="missing"):
        save(2, ranks=(0,))                                   # rank 1's upload never arrived
    assert not (root / "0000002" / sc.MARKER).exists()
    save(3)
    save(4)
    with pytest.raises(RuntimeError):
        save(5, ranks=(1,))
    assert sc.rotate_remote(root, keep=2) == [1, 2]          # complete 1 (beyond keep) and dead 2
    assert [s for s, _ in sc.remote_steps(root)] == [3, 4, 5]
    assert sc.choose_remote(root, None, auto_resume=True)[0] == 4
    assert sc.choose_remote(root, 3, auto_resume=False)[0] == 3    # Ray Train's restart step wins
    assert sc.choose_remote(root, 5, auto_resume=False)[0] == 4    # ... unless it is not complete
    assert sc.choose_remote(root, None, auto_resume=False) is None
    save(4)                                                   # a re-save withdraws the old attempt first
    assert sc.remote_is_complete(root / "0000004")
