"""Output paths that stay where they belong, and writes that are atomic.

Every file the project writes goes through `atomic_write`: the content is written to a
temporary file in the destination folder and renamed into place, so an interrupted write
leaves either the previous file or nothing under the final name — never half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OutputExistsError, UnsafePathError


def contained_path(folder: str | Path, name: str | Path) -> Path:
    """`folder / name`, refusing names that leave `folder` (`..`, absolute paths, symlinks out)."""
    folder = Path(folder)
    name = Path(name)
    if name.is_absolute():
        raise UnsafePathError(f"output name '{name}' is absolute; expected a name inside '{folder}'")
    if ".." in name.parts:
        raise UnsafePathError(f"output name '{name}' contains '..'; expected a name inside '{folder}'")
    target = folder / name
    root = folder.resolve()
    resolved = target.resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(f"output '{target}' resolves to '{resolved}', outside '{root}' (a symlink?)")
    return target


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """Raise if `path` exists and `overwrite` is false."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"'{path}' already exists; pass --overwrite (overwrite=True) to replace it")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it to `path`.

    The temporary file is removed if `write` raises (including KeyboardInterrupt).
    """
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)
