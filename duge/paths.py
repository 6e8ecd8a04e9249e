"""Output paths that stay where they belong, and writes that are atomic.

Every file the project writes goes through `atomic_write`: the content is written to a
temporary file in the destination folder and renamed into place, so an interrupted write
leaves either the previous file or nothing under the final name — never half a file.

Temporaries are named `.<final name>.<writer's pid>.<random>.tmp` (folders the same, from
`temporary_folder`). A writer that is killed (SIGKILL, power loss) cannot remove its own; the next
write of the same name removes those whose writer process no longer runs
(`remove_stale_temporaries`), and never those of a writer that is still running. (A `.old`
folder — the previous version moved aside during a replace — is never removed automatically.)
"""

from __future__ import annotations

import os
import re
import shutil
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


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process (or a malformed number: leave it alone)
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the `.tmp` temporaries of `path` (files or folders) whose writer process no longer runs."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^./]+\.tmp$")
    removed = []
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _process_runs(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def temporary_folder(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new empty folder beside `path` named as a temporary of it (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=suffix, dir=path.parent))


def atomic_write(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it to `path`.

    The temporary file is removed if `write` raises (including KeyboardInterrupt); temporaries
    left by killed writers of `path` are removed first. The data is fsynced before the rename.
    """
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
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
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)
