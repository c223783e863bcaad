"""Atomic file writes: a temporary file next to the target, renamed onto it when complete, so a killed run never
leaves a half-written file under the final name; new files get the mode of a plain ``open()`` (the umask's)."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import tempfile
from collections.abc import Iterator

import h5py


_UMASK: int | None = None


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: 0o666 less the process umask (e.g. 0o644).

    The umask is read once, from /proc/self/status where the kernel shows it, else by setting and
    restoring it (before other threads exist, at the first call)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                _UMASK = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return 0o666 & ~_UMASK


def new_temporary(path: str | os.PathLike) -> pathlib.Path:
    """Creates an empty temporary file ``.NAME.XXXX.tmp`` next to ``path`` with the mode of a normal new file
    (``file_mode``: readable by group and others under the usual umask, not mkstemp's 0600)."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return pathlib.Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` if the block succeeds.

    The parent directory is created. On an exception the temporary file is removed and ``path`` is left
    as it was.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = new_temporary(path)
    try:
        try:
            yield tmp_path
        except OSError as err:  # name the file being written, not its temporary name
            if err.errno is None:
                raise
            raise OSError(err.errno, err.strerror, os.fspath(path)) from None
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def h5_atomic(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Yields a new HDF5 file built in memory, written to ``path`` atomically when the block succeeds.

    For run outputs (model-sized): a full disk then fails as one plain OSError naming ``path``, where HDF5
    writing to disk would fail inside its C library, reporting on stderr while closing."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    write_bytes_atomic(path, buffer.getvalue())
