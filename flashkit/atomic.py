"""Files flashkit writes (results, exports, reports, pages) are written atomically.

The text goes to a temporary file in the same folder, is flushed to disk, and then renamed over the
target with os.replace: a reader never sees half a file, and a crash leaves the old file in place.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text: str, *, make_parents: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path.

    The folder must exist unless make_parents is True (a missing folder raises FileNotFoundError
    naming it, rather than creating folders where a typo pointed).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if make_parents:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} for {str(path)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; ours are for reading
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json(path, data, *, make_parents: bool = True) -> Path:
    """`data` as indented JSON, written atomically (parent folders created by default)."""
    return write_text(path, json.dumps(data, indent=1) + "\n", make_parents=make_parents)
