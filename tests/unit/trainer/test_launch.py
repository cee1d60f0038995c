"""trainer/launch.py without Ray: which worker errors are the user's (reported once, not retried), the one
line the driver prints for what TorchTrainer.fit raised, and the paths a `ray job submit` run refuses.
Real runs: tests/integration/test_ray_address.py (a user error inside a worker) and test_multinode.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from model.checkpoint import CheckpointError
from pipelines.ingest import ray_session
from pipelines.mixture.config import MixtureConfigError
from trainer import launch
from trainer.checkpoint.local import ResumeError
from trainer.config import ConfigError, load_config, resolve_paths
from trainer.loop import InjectedFailure

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("exc, user", [
    (ConfigError("bad flag"), True),
    (MixtureConfigError("unknown dataset 'ct_mr_vqq'"), True),
    (ResumeError("no checkpoint"), True),
    (CheckpointError("missing weights"), True),
    (ValueError("a library's ValueError"), False),            # not the project's: may be a bug, keep retrying
    (InjectedFailure("injected failure"), False),            # the recovery test's infrastructure failure
    (RuntimeError("gloo: connection reset"), False),
    (OSError("disk gone"), False),
])
def test_user_errors_are_the_projects_input_errors(exc, user):
    assert launch.is_user_error(exc) is user


def _worker_group_error(failures: dict[int, BaseException]):
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("\n".join(f"[Rank {r}]\n{e}" for r, e in failures.items()), failures)


def test_failure_line_takes_the_first_user_error_once():
    msg = launch.USER_ERROR_MARK + "unknown dataset 'ct_mr_vqq' (close matches: ct_mr_vqa)"
    err = _worker_group_error({1: RuntimeError(f"Traceback (most recent call last):\n  File x\n{msg}"),
                               0: RuntimeError(msg)})
    line, user = launch.failure_line(err)
    assert user and line == "unknown dataset 'ct_mr_vqq' (close matches: ct_mr_vqa)"


def test_failure_line_for_infrastructure_failures_names_each_rank_in_one_line():
    err = _worker_group_error({0: RuntimeError("Traceback (most recent call last):\n  File a\nOSError: disk gone"),
                               1: RuntimeError("ActorDiedError: the actor died unexpectedly")})
    line, user = launch.failure_line(err)
    assert not user and "\n" not in line
    assert line == "WorkerGroupError: rank 0: OSError: disk gone; rank 1: ActorDiedError: the actor died unexpectedly"


def test_one_line_flattens_messages():
    assert launch.one_line(ConfigError("a\n  b\tc")) == "a b c"
    assert launch.one_line(ConfigError("")) == "ConfigError"


def _cfg(*argv: str):
    return resolve_paths(load_config(["--config", str(ROOT / "configs" / "radiology_sft.yaml"), *argv]))


def test_submitted_job_refuses_the_default_storage_path_and_shards_inside_the_job(monkeypatch, tmp_path):
    session = tmp_path / "ray" / "session_x"
    workdir = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    workdir.mkdir(parents=True)
    assert launch.submitted_job_problems(_cfg()) == []                 # not a submitted job: nothing refused
    monkeypatch.setenv(ray_session.JOB_ENV, "{}")
    monkeypatch.chdir(workdir)
    # the config's catalog (../catalog/radiology.yaml) lives in the repository here; its output_dir
    # (../shards) is checked like the shards of the shipped config inside the unpacked package would be
    monkeypatch.setattr(launch, "_shards_root", lambda cfg: str(workdir / "shards"))
    problems = launch.submitted_job_problems(_cfg())                   # storage_path: runs (relative)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"--storage_path {workdir / 'runs'} ")
    assert "shards folder" in problems[1] and "s3://" in problems[1]
    shared = tmp_path / "shared"
    monkeypatch.setattr(launch, "_shards_root", lambda cfg: str(shared / "shards"))
    assert launch.submitted_job_problems(_cfg("--storage_path", str(shared / "runs"))) == []
    assert launch.submitted_job_problems(_cfg("--storage_path", "s3://bucket/runs")) == []


def test_shards_root_is_the_mixtures_shards_else_its_catalogs_output_dir(tmp_path):
    assert launch._shards_root(_cfg()) == str((ROOT / "shards").resolve())
    mix = tmp_path / "mix.yaml"
    mix.write_text((ROOT / "configs" / "radiology_sft.yaml").read_text().replace(
        "catalog: ../catalog/radiology.yaml", f"catalog: {ROOT / 'catalog' / 'radiology.yaml'}\nshards: /shared/shards"))
    cfg = resolve_paths(load_config(["--config", str(mix)]))
    assert launch._shards_root(cfg) == "/shared/shards"


def test_a_user_error_is_found_under_the_loaders_wrapper():
    from pipelines.packing.packer import PackingError

    try:
        try:
            raise PackingError("no sample of this pack could be decoded")
        except PackingError as inner:
            raise RuntimeError(f"batch loader failed: {inner!r}") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert str(launch.user_error_in(wrapped)) == "no sample of this pack could be decoded"
    assert launch.user_error_in(RuntimeError("gloo: connection reset")) is None
