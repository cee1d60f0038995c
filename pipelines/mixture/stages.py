"""Curriculum stages: group weights that change by optimizer step, in the mixture YAML.

    stages:
      - {name: foundation, until_step: 85, weight: {sft: 3, t2i: 1}}
      - {name: unified, until_step: 275, weight: {sft: 1, t2i: 3}}

Stage i covers optimizer steps [until_step of stage i-1, until_step of stage i); steps past the last
boundary stay in the last stage. Groups a stage does not name keep their configured weight; 0 pauses a
group. A pack's step is known when it is decided (pack index, loader slot, gradient accumulation), so
weights are a pure function of the stream position and resume is exact across boundaries.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable

STAGE_KEYS = ("name", "until_step", "weight")


@dataclass(frozen=True)
class Stage:
    """One curriculum stage; `weights` holds a raw weight for every group (config order)."""

    name: str
    until_step: int
    weights: tuple[float, ...]
    line: int | None = None


def parse_stages(raw: Any, groups: list[tuple[str, tuple[str, ...], float, bool]], err: Callable,
                 top: Any) -> tuple[Stage, ...]:
    """Stages from the `stages:` value. `groups`: (name, other accepted names, configured weight, mandatory)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise err("stages", "stages must be a non-empty list of {until_step: N, weight: {GROUP: w}} entries", top)
    by_name = {name: i for i, (name, _, _, _) in enumerate(groups)}
    for i, (_, aliases, _, _) in enumerate(groups):   # a list-form group: its task kind's alias or class name
        for alias in aliases:
            by_name.setdefault(alias, i)
    out: list[Stage] = []
    previous = 0
    for n, entry in enumerate(raw, start=1):
        label = f"stages[{n}]"
        if not isinstance(entry, dict):
            raise err("stages", f"{label} must be a mapping {{until_step: N, weight: {{GROUP: w}}}}, got {entry!r}",
                      top)
        for k in entry:
            if k not in STAGE_KEYS:
                close = difflib.get_close_matches(str(k), STAGE_KEYS, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise err(k, f"{label}: unknown field {k!r}{hint}; allowed: {', '.join(STAGE_KEYS)}", entry)
        until = entry.get("until_step")
        if isinstance(until, bool) or not isinstance(until, int) or until <= previous:
            raise err("until_step" if "until_step" in entry else None,
                      f"{label}.until_step must be a whole number greater than "
                      f"{'0' if n == 1 else 'the previous stage’s ' + str(previous)}, got {until!r}", entry)
        name = entry.get("name", f"stage{n}")
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise err("name", f"{label}.name must be a short text, got {name!r}", entry)
        weights = [w for _, _, w, _ in groups]
        given = entry.get("weight", {})
        if not isinstance(given, dict):
            raise err("weight", f"{label}.weight must be a mapping {{GROUP: weight}}, got {given!r}", entry)
        for group, value in given.items():
            if group not in by_name:
                close = difflib.get_close_matches(str(group), list(by_name), n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise err("weight", f"{label}.weight names group {group!r}, which is not in the config{hint}; "
                                    f"groups: {', '.join(g[0] for g in groups)}", given)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < 0):
                raise err(group, f"{label}.weight[{group}] must be a finite number >= 0, got {value!r}", given)
            gi = by_name[group]
            if value == 0 and groups[gi][3]:
                raise err(group, f"{label}.weight[{group}] is 0, but the group is is_mandatory (every pack "
                                 f"carries one of its samples); drop is_mandatory or give it a weight > 0", given)
            weights[gi] = float(value)
        if sum(weights) <= 0:
            raise err("weight", f"{label}: all group weights are zero in this stage; give one a positive weight",
                      entry)
        out.append(Stage(str(name), until, tuple(weights), getattr(entry, "line", None)))
        previous = until
    names = [s.name for s in out]
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise err("stages", f"stage name(s) {twice} appear twice; give each stage its own name", top)
    return tuple(out)


def stage_index(stages: tuple[Stage, ...], step: int) -> int:
    """Index of the stage that optimizer step `step` (0-based) belongs to; the last one past its end."""
    for i, s in enumerate(stages):
        if step < s.until_step:
            return i
    return len(stages) - 1


def stage_start(stages: tuple[Stage, ...], i: int) -> int:
    """First optimizer step of stage i."""
    return 0 if i == 0 else stages[i - 1].until_step


def normalised(weights: tuple[float, ...] | list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def stage_record(stages: tuple[Stage, ...], step: int) -> dict:
    """The metrics fields of the stage optimizer step `step` (0-based) is in: index, name, boundaries."""
    if not stages:
        return {}
    i = stage_index(stages, step)
    return {"stage": i, "stage_name": stages[i].name, "stage_start_step": stage_start(stages, i),
            "stage_until_step": stages[i].until_step}
