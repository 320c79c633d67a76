"""Writing files so that a crash never leaves one half-written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename ``tmp`` onto ``path``: the file is whole or absent.

    ``tmp`` sits beside ``path`` (a rename within one file system is atomic) and keeps its
    suffix, for writers that pick a format by it (matplotlib); it is removed if
    ``write`` fails.
    """
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
