"""On-disk cache entries shared by concurrent processes (decoded datasets, extracted features).

    with entry_lock(path):                 # one builder per entry; the others wait here
        value = read(path) or build_and(atomic_write(path, write))

`atomic_write` writes a temporary file in the entry's folder and renames it over the entry, so a reader
sees either no entry or a whole one, never a part, and a failed write leaves no temporary file behind.
`entry_lock` holds `<entry>.lock` (the `filelock` package: an OS lock, released if its holder dies), so
two processes that miss the same entry build it once: the second waits, then reads the finished entry.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_write", "entry_lock"]


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a fresh temporary file next to `path`, then rename it to `path` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; entries are shared like any cache file
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: never leave a stray temporary file
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _acquire(path: Path):
    """A held lock on `path`.lock, or None where the cache folder cannot hold one."""
    from filelock import FileLock

    lock = FileLock(f"{path}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except PermissionError:
        return None  # a read-only cache: nothing will be written either, and saving warns about that
    except (OSError, NotImplementedError) as exc:
        warnings.warn(f"cannot lock cache entry {path} ({type(exc).__name__}: {exc}); "
                      f"concurrent processes may each build it", stacklevel=4)
        return None
    return lock


@contextlib.contextmanager
def entry_lock(path: Path) -> Iterator[bool]:
    """Hold the lock of cache entry `path` for the block; yields whether it is held. Without locking
    support the block still runs (atomic writes keep the entry whole; only the work may be repeated)."""
    lock = _acquire(Path(path))
    try:
        yield lock is not None
    finally:
        if lock is not None:
            lock.release()
