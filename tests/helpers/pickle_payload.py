"""What an attacker pickles into a checkpoint file: loading it with weights_only=False runs `touch MARKER` (a
shell command), so a test can tell whether a load ran code by whether the marker file exists."""
from __future__ import annotations

import os
from pathlib import Path


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))
