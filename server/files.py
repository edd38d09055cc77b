"""Files other programs read while shoal rewrites them: written whole, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

MODE = 0o644


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step, mode 0644.

    The bytes go to a temporary file in the same directory, which is then renamed over
    `path`: a reader sees the old content or the new, never a half-written file.

    Raises:
        OSError: the directory does not exist or is not writable.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), MODE)
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
