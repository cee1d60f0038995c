"""Run the chunk tasks of an ingest: mapped with Ray Data over a cluster (or a local Ray), or one by one in
this process, with a progress line either way.

A chunk whose worker dies (or whose runner raises) is retried once, as its own Ray task; when that fails
too, its lines become `worker_failed` rejects (`pipelines.ingest.chunk.failed_chunk`). So every line ends
in a shard or in the rejects, and one bad chunk never stops the other datasets of the run.

The caller passes the function that builds one chunk (`pipelines.ingest.chunk.process_chunk`, or the
object-storage variant in `pipelines.ingest.remote`), so this module needs to know neither output kind.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, TextIO

from pipelines.ingest.build import DatasetPlan, IngestError
from pipelines.ingest.chunk import ChunkResult, ChunkTask, failed_chunk
from pipelines.ingest.ray_session import RaySessionError, requested_address, start_or_join

ROOT = Path(__file__).resolve().parents[2]   # the repository: Ray workers import `pipelines` from here
ChunkRunner = Callable[[ChunkTask], ChunkResult]   # builds one chunk where its task says; returns its counts


# -- progress -------------------------------------------------------------------------------------------

class Progress:
    """One status line on stderr, redrawn in place on a terminal, at most every few seconds otherwise."""

    def __init__(self, total_rows: int, total_chunks: int, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total_rows, self.total_chunks = total_rows, total_chunks
        self.rows = self.chunks = self.bytes = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()
        self.last = 0.0

    def update(self, result: dict[str, Any]) -> None:
        self.rows += result["rows_read"] + result["blank_lines"]
        self.chunks += 1
        self.bytes += result["shard_bytes"]
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self.last < 2.0 and self.chunks < self.total_chunks):
            return
        self.last = now
        elapsed = now - self.started
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        line = (f"[ingest] chunks {self.chunks}/{self.total_chunks}  lines {self.rows:,}/{self.total_rows:,}  "
                f"{self.bytes / 1e6:,.1f} MB written  {rate:,.0f} lines/s  {elapsed:.1f} s")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- Ray ------------------------------------------------------------------------------------------------

def _ensure_ray(address: str | None, say: Callable[[str], None] = lambda m: None) -> bool:
    """Use this process's running Ray if there is one; else join `address`/RAY_ADDRESS or start a local Ray
    of its own (pipelines.ingest.ray_session). Returns True when this call started (and so must stop) Ray."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}}
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "runtime_env": env}
    joining = requested_address(address)
    say(f"[ingest] joining Ray at {joining}" if joining else
        f"[ingest] starting a local Ray ({os.cpu_count() or 2} CPUs; takes a few seconds)")
    try:
        _, note = start_or_join(address, local={"num_cpus": os.cpu_count() or 2, "include_dashboard": False,
                                                "object_store_memory": 256 * 1024 * 1024, **quiet}, join=quiet)
    except RaySessionError as exc:
        raise IngestError(str(exc)) from None
    if note:
        say(f"[ingest] note: {note}")
    return True


def _process_batch(batch: dict[str, Any], run_chunk: ChunkRunner) -> dict[str, list]:
    """Ray Data UDF: one batch of chunk tasks -> one batch of chunk results (small dicts only)."""
    import json as _json

    keys = list(batch)
    n = len(batch[keys[0]])
    out: dict[str, list] = {"result": []}
    for i in range(n):
        task = ChunkTask(**_json.loads(batch["task"][i]))
        result = run_chunk(task).to_dict()
        result["node_id"] = _node_id()   # which node did the work (IngestReport.nodes)
        out["result"].append(_json.dumps(result))
    return out


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray: no node id
        return None


def _run_one(task: dict[str, Any], run_chunk: ChunkRunner) -> str:
    """One chunk as a plain Ray task (the retry of a chunk Ray Data could not finish)."""
    import json as _json

    result = run_chunk(ChunkTask(**task)).to_dict()
    result["node_id"] = _node_id()
    return _json.dumps(result)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _run_chunks(tasks: list[ChunkTask], run_chunk: ChunkRunner, on_result: Callable[[dict], None],
                address: str | None, say: Callable[[str], None] = lambda m: None) -> dict[int, str]:
    """Map `run_chunk` over `tasks` with Ray Data, then retry the chunks that did not come back once, each
    as its own task; {position in tasks: why} for those that failed twice."""
    import json as _json

    import ray
    import ray.data

    started_here = _ensure_ray(address, say)
    for name in ("ray.data", "ray"):   # our progress line replaces Ray Data's own log lines
        logging.getLogger(name).setLevel(logging.ERROR)
    done: set[tuple[str, int]] = set()

    def take(result: dict) -> None:
        done.add((result["dataset"], result["chunk_index"]))
        on_result(result)

    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False            # we print our own progress line
        ctx.execution_options.preserve_order = False
        if hasattr(ctx, "print_on_execution_start"):
            ctx.print_on_execution_start = False
        previous_errored = ctx.max_errored_blocks
        ctx.max_errored_blocks = -1                 # a failed chunk must not stop the others; retried below
        items = [{"task": _json.dumps(t.to_dict(), default=str)} for t in tasks]
        try:
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            # Ray Data retries a task whose worker died forever by default (a chunk that kills its worker
            # would hang the run): one try here, one retry below. No named parameter exists for it yet.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                ds = ds.map_batches(_process_batch, fn_kwargs={"run_chunk": run_chunk}, batch_size=1,
                                    batch_format="numpy", num_cpus=1, zero_copy_batch=False,
                                    max_retries=0)
            for row in ds.iter_rows():
                take(_json.loads(row["result"]))
        except Exception as exc:  # noqa: BLE001 - whatever did not come back is retried below
            say(f"[ingest] Ray Data stopped ({_why(exc)}); retrying the unfinished chunks one by one")
        finally:
            ctx.max_errored_blocks = previous_errored
        missing = [i for i, t in enumerate(tasks) if (t.dataset, t.chunk_index) not in done]
        if missing:
            say(f"[ingest] retrying {len(missing)} chunk(s) whose worker failed")
        retry = ray.remote(num_cpus=1, max_retries=0)(_run_one)
        refs = {i: retry.remote(tasks[i].to_dict(), run_chunk) for i in missing}
        failures: dict[int, str] = {}
        for i, ref in refs.items():
            try:
                take(_json.loads(ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - failed twice: its lines become worker_failed rejects
                failures[i] = _why(exc)
        return failures
    finally:
        if started_here:
            ray.shutdown()


def _run_local(tasks: list[ChunkTask], run_chunk: ChunkRunner,
               on_result: Callable[[dict], None]) -> dict[int, str]:
    """The chunks one by one in this process, each retried once when it raises."""
    failures: dict[int, str] = {}
    for i, task in enumerate(tasks):
        for attempt in (1, 2):
            try:
                on_result(run_chunk(task).to_dict())
                break
            except Exception as exc:  # noqa: BLE001 - retried once, then its lines are rejected
                if attempt == 2:
                    failures[i] = _why(exc)
    return failures


def execute_chunks(plans: list[DatasetPlan], tasks: list[ChunkTask], run_chunk: ChunkRunner, executor: str,
                   address: str | None, say: Callable[[str], None], stream: TextIO | None, progress: bool,
                   discard_staging: Callable[[DatasetPlan], None]) -> dict[str, int]:
    """Run every chunk with `run_chunk` (in Ray Data workers or in this process), collect results into their
    plans; {node id: chunks}.

    A chunk that failed twice comes back as `worker_failed` rejects. If the run itself is interrupted,
    every plan's staging is discarded and the error propagates: nothing half-built is ever published.
    """
    by_name = {plan.spec.name: plan for plan in plans}
    nodes: dict[str, int] = {}
    if not tasks:
        return nodes
    bar = Progress(sum(p.scan.lines for p in plans), len(tasks), stream, enabled=progress)

    def on_result(result: dict) -> None:
        by_name[result["dataset"]].results.append(result)
        if result.get("node_id"):
            nodes[result["node_id"]] = nodes.get(result["node_id"], 0) + 1
        bar.update(result)

    try:
        if executor == "ray":
            failures = _run_chunks(tasks, run_chunk, on_result, address, say)
        else:
            failures = _run_local(tasks, run_chunk, on_result)
        for i, why in failures.items():
            say(f"[ingest] {tasks[i].dataset}: chunk {tasks[i].chunk_index} failed twice ({why}); its lines are "
                f"rejected as worker_failed")
            on_result(failed_chunk(tasks[i], why).to_dict())
    finally:
        bar.close()
        if any(len(p.results) != p.expected_chunks for p in plans):
            for plan in plans:
                discard_staging(plan)
    return nodes
