"""Extension hooks named as "module:function" strings (catalog option validators, image format handlers,
post-ingest checks), so a core module can call an extension without importing it at start-up."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def resolve_hook(entry: str | Callable[..., Any]) -> Callable[..., Any] | None:
    """The function an entry names (callables are returned as they are); None when its module is not
    installed. An import error inside an installed module propagates: it is a bug, not a missing extension."""
    if not isinstance(entry, str):
        return entry
    module_name, _, function = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    return getattr(module, function)
