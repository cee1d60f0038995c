"""Which Ray a job uses and which paths a `ray job submit` job may use (pipelines/ingest/ray_session.py), without
starting Ray: the address file, a live or stale cluster address (a real listening socket), and the path
rule under the job supervisor's environment variable. The real clusters are in
tests/integration/test_ray_address.py and tests/integration/test_multinode.py."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.ingest import ray_session as rs


@pytest.fixture
def no_ray_env(monkeypatch):
    for name in ("RAY_TMPDIR", "TMPDIR", "RAY_ADDRESS", rs.JOB_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_address_file_follows_ray_tmpdir_then_tmpdir_then_tmp(no_ray_env, tmp_path):
    # Ray's own lookup order (documented in docs/cluster.md#which-ray): RAY_TMPDIR, TMPDIR (Linux), /tmp
    assert rs.ray_address_file() == Path("/tmp/ray/ray_current_cluster")
    no_ray_env.setenv("TMPDIR", str(tmp_path / "t"))
    assert rs.ray_address_file() == tmp_path / "t" / "ray" / "ray_current_cluster"
    no_ray_env.setenv("RAY_TMPDIR", str(tmp_path / "r"))
    assert rs.ray_address_file() == tmp_path / "r" / "ray" / "ray_current_cluster"


def test_machine_cluster_live_stale_missing_and_garbage(no_ray_env, tmp_path):
    no_ray_env.setenv("RAY_TMPDIR", str(tmp_path))
    assert rs.machine_cluster() is None                          # no address file
    file = tmp_path / "ray" / "ray_current_cluster"
    file.parent.mkdir()
    with socket.socket() as server:                              # a live "GCS": something listens
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        file.write_text(live + "\n")
        assert rs.machine_cluster() == live
    assert rs.machine_cluster() is None                          # the same address, nobody listens: stale
    for garbage in ("", "not an address", "host:port", "\x00\x01"):
        file.write_text(garbage)
        assert rs.machine_cluster() is None
    file.write_bytes(b"\xff\xfe")                                # not UTF-8
    assert rs.machine_cluster() is None


def test_requested_address_flag_then_env(no_ray_env):
    assert rs.requested_address(None) is None
    no_ray_env.setenv("RAY_ADDRESS", "  ")
    assert rs.requested_address(None) is None                     # blank RAY_ADDRESS = not set
    no_ray_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert rs.requested_address(None) == "10.0.0.1:6379"
    assert rs.requested_address("auto") == "auto"


def test_unreachable_address_is_one_line_before_ray_is_touched(no_ray_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                 # closed again: nobody listens
    with pytest.raises(rs.RaySessionError) as err:
        rs.start_or_join(f"127.0.0.1:{port}", local={}, join={})
    text = str(err.value)
    assert "\n" not in text and f"127.0.0.1:{port}" in text and "ray start --head" in text


def test_paths_outside_a_submitted_job_are_never_refused(no_ray_env, tmp_path):
    no_ray_env.chdir(tmp_path)
    assert rs.submitted_job_dir() is None
    assert rs.job_path_problem("runs", "--storage_path") is None


def _in_job(monkeypatch, tmp_path) -> Path:
    """The layout `ray job submit --working-dir .` gives the entrypoint: its cwd is the unpacked package."""
    session = tmp_path / "ray" / "session_2026-12-06_12-00-00_000000_1"
    workdir = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    monkeypatch.setenv(rs.JOB_ENV, '{"runtime_env": {}}')
    return session


def test_submitted_job_refuses_relative_and_session_paths_only(no_ray_env, tmp_path):
    session = _in_job(no_ray_env, tmp_path)
    assert rs.submitted_job_dir() == session.resolve()
    for path in ("runs", "./runs", "../shards", "sub/dir", str(session / "x")):
        problem = rs.job_path_problem(path, "--storage_path")
        assert problem is not None and "\n" not in problem, path
        assert problem.startswith(f"--storage_path {path} ") and "s3://" in problem and "every node" in problem
    shared = tmp_path / "shared" / "runs"
    assert rs.job_path_problem(str(shared), "--storage_path") is None
    assert rs.job_path_problem("s3://bucket/runs", "--storage_path") is None


def test_submitted_job_without_a_session_folder_uses_its_cwd(no_ray_env, tmp_path):
    no_ray_env.chdir(tmp_path)
    no_ray_env.setenv(rs.JOB_ENV, "{}")
    assert rs.submitted_job_dir() == tmp_path.resolve()
    assert rs.job_path_problem("runs", "--out") is not None
    assert rs.job_path_problem(str(tmp_path.parent / "elsewhere"), "--out") is None


_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(_segment, min_size=1, max_size=4), scheme=st.sampled_from(["s3", "gs", "file"]))
def test_any_relative_path_is_refused_and_any_uri_accepted_in_a_job(tmp_path_factory, parts, scheme):
    tmp = tmp_path_factory.mktemp("job")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RAY_TMPDIR", "TMPDIR", "RAY_ADDRESS"):
            mp.delenv(name, raising=False)
        _in_job(mp, tmp)
        relative = "/".join(parts)
        assert rs.job_path_problem(relative, "x") is not None
        assert rs.job_path_problem(f"{scheme}://bucket/{relative}", "x") is None


def test_a_job_server_url_in_ray_address_is_one_line_that_says_how_to_submit(no_ray_env):
    # the README exports RAY_ADDRESS=http://HEAD_IP:8265 for `ray job submit`; a job run by hand in that
    # shell must not try to ray.init() a dashboard URL
    no_ray_env.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    with pytest.raises(rs.RaySessionError) as err:
        rs.start_or_join(None, local={}, join={})
    assert "\n" not in str(err.value) and "ray job submit" in str(err.value) and "unset RAY_ADDRESS" in str(err.value)
