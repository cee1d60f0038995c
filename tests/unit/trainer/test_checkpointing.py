"""trainer.checkpoint.local: checkpoint directories (complete marker, atomic finalize, rotation) and the
resume decision table."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.checkpoint import local as ck


def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = ck.prepare_temp(root, step)
    files = [ck.MODEL_FILE, ck.EMA_FILE, ck.SCHEDULER_FILE, ck.optimizer_file(0, 1), ck.stream_state_file(0, 1)]
    for f in files:
        (tmp / f).write_text("x")
    if complete:
        return ck.finalize(root, step, files)
    final = root / ck.step_dir_name(step)
    tmp.rename(final)           # looks like a checkpoint, but no marker: a crash mid-save
    return final


def test_newest_complete_ignores_incomplete_and_non_numeric(tmp_path):
    _fake_ckpt(tmp_path, 10)
    _fake_ckpt(tmp_path, 20)
    _fake_ckpt(tmp_path, 30, complete=False)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "99999x").mkdir()
    assert ck.newest_complete(tmp_path).name == "0000020"
    assert not ck.is_complete(tmp_path / "0000030")
    # a listed file missing also makes it incomplete
    (tmp_path / "0000020" / ck.optimizer_file(0, 1)).unlink()
    assert ck.newest_complete(tmp_path).name == "0000010"


@settings(max_examples=20, deadline=None)
@given(st.dictionaries(st.integers(0, 10**6), st.booleans(), max_size=6), st.integers(1, 3))
def test_newest_complete_and_rotation_properties(table, keep):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for step, complete in table.items():
            _fake_ckpt(root, step, complete)
        complete = sorted(s for s, c in table.items() if c)
        newest = ck.newest_complete(root)
        assert (newest is None and not complete) or int(newest.name) == complete[-1]
        ck.rotate(root, keep)
        left = [s for s, _ in ck.numeric_checkpoints(root)]
        assert [s for s in left if s in complete] == complete[-keep:]
        # incomplete directories survive only when newer than the newest complete one
        assert all(table[s] or not complete or s > complete[-1] for s in left)


def test_finalize_refuses_missing_files_and_is_atomic(tmp_path):
    tmp = ck.prepare_temp(tmp_path, 5)
    (tmp / ck.MODEL_FILE).write_text("x")
    with pytest.raises(RuntimeError, match="missing"):
        ck.finalize(tmp_path, 5, [ck.MODEL_FILE, ck.EMA_FILE])
    assert not (tmp_path / "0000005").exists() and ck.newest_complete(tmp_path) is None


def test_rotation_keeps_newest_complete(tmp_path):
    for s in (1, 2, 3, 4):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 5, complete=False)
    ck.prepare_temp(tmp_path, 6)
    ck.rotate(tmp_path, keep=2)
    assert [p.name for _, p in ck.numeric_checkpoints(tmp_path)] == ["0000003", "0000004", "0000005"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_resume_plan_decision_table(tmp_path):
    root = tmp_path / "ckpts"
    _fake_ckpt(root, 4)
    _fake_ckpt(root, 8, complete=False)
    kw = dict(checkpoint_dir=root, model_path=None, resume_model_only=False, resume_model_optimizer=True)
    p = ck.plan_resume(auto_resume=True, resume_from=None, finetune_from_ema=True, **kw)
    assert p.source.name == "0000004" and p.load_train_state and p.weights_file == ck.MODEL_FILE  # ema forced off
    p = ck.plan_resume(auto_resume=False, resume_from=str(root / "0000004"), finetune_from_ema=True, **kw)
    assert p.weights_file == ck.EMA_FILE and not p.load_train_state
    p = ck.plan_resume(auto_resume=False, resume_from=str(root / "0000004"), finetune_from_ema=False, **kw)
    assert p.load_train_state
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / ck.EMA_FILE).write_text("x")
    noema = tmp_path / "noema"
    noema.mkdir()
    (noema / ck.MODEL_FILE).write_text("x")
    with pytest.raises(ck.ResumeError, match="no ema.safetensors"):   # UMV: a hard error, never random init
        ck.plan_resume(auto_resume=False, resume_from=str(noema), finetune_from_ema=True, **kw)
    with pytest.raises(ck.ResumeError, match="pass --finetune_from_ema True"):
        ck.plan_resume(auto_resume=False, resume_from=None, finetune_from_ema=False,
                       **{**kw, "model_path": str(hf)})
    p = ck.plan_resume(auto_resume=True, resume_from=None, finetune_from_ema=True,
                       **{**kw, "checkpoint_dir": tmp_path / "empty", "model_path": str(hf)})
    assert p.source == hf and p.weights_file == ck.EMA_FILE and not p.load_train_state
