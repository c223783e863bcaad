"""The life cycle of a run directory: lock, start or resume checks, provenance, clean-up of a failed start.

A run directory (``--out``) goes through these states (``status``):

- ``new``: missing or empty. A run may start in it.
- ``failed-start``: only run-directory entries (config.toml, run.json, metrics.jsonl, iterations/, ...)
  and no finished checkpoint: a start that failed or was killed before its first checkpoint. A new start
  (with or without ``--resume``) clears these entries and starts over; nothing of value is lost.
- ``started``: holds at least one finished checkpoint. Only ``--resume`` continues it.
- ``foreign``: holds other files. Nothing starts in it.

While a run works in it, the directory holds ``run.lock`` (JSON: pid, host, start time, command line) with
an exclusive ``flock`` on it: a second run on the same directory is refused at once, naming the owner. A
lock left behind by a killed process is stale (the kernel dropped its ``flock``) and is taken over with a
warning. ``run.json`` records, for every start, the command line, user, host, package versions, devices,
the resolved config and the data set's identity (absolute path, size, SHA-256 of its frame index), which
``--resume`` and ``--init-from`` check. Nothing in here imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import getpass
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

from emcjax import atomic_files, checkpoint, cli, runio, toml_config
from emcjax.errors import ConfigError, DataError

LOCK_FILE = "run.lock"
PROVENANCE_FILE = "run.json"
RUN_ENTRIES = frozenset({
    LOCK_FILE, PROVENANCE_FILE, runio.CONFIG_FILE, runio.METRICS_FILE, runio.INTENSITIES_FILE,
    runio.ITERATIONS_DIR, checkpoint.CHECKPOINTS_DIR, checkpoint.DAMAGED_DIR, "figures",
    "frame_weights.h5", "rejection.h5", runio.REFINEMENT_DIR, "source.json",
})
"""Names a runner writes in a run directory (besides ``.NAME.XXXX.tmp`` files of atomic writes): with
``--frame-weights``/``--half`` lowres records ``frame_weights.h5``; ``emcjax.reject`` adds ``rejection.h5``; orientation refinement keeps its state in ``refinement/``; ``emcjax.highres`` writes
``source.json``."""
VERSIONED_PACKAGES = ("emcjax", "jax", "jaxlib", "numpy", "h5py", "orbax-checkpoint", "gemmi", "scipy")


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or (name.startswith(".") and name.endswith(".tmp"))


def status(out: pathlib.Path) -> str:
    """``new``, ``failed-start``, ``started`` or ``foreign`` (see the module docstring)."""
    if not out.is_dir():
        return "new"
    names = [p.name for p in out.iterdir()]
    if not names:
        return "new"
    if not all(_is_run_entry(n) for n in names):
        return "foreign"
    if checkpoint.complete_steps(out) or runio.INTENSITIES_FILE in names:
        return "started"
    return "failed-start"


# ----------------------------------------------------------------------------------------------------
# Lock


class RunLock:
    """An exclusive lock on a run directory: ``run.lock`` holding the owner's pid and host, ``flock``ed."""

    def __init__(self, out: pathlib.Path):
        self.path = out / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, log: Callable[[str], None]) -> None:
        """Takes the lock or raises ConfigError naming its owner (a stale lock is taken over, with a warning)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, atomic_files.file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise ConfigError(
                    f"out: run directory {self.path.parent} is in use by {self._describe(self._read())} "
                    f"(lock file {self.path}); wait for that run to finish or choose another --out"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # else the previous owner removed the file between our open and flock: retry
                break
            os.close(fd)
        previous = self._read()
        if previous:
            log(f"warning: took over the stale lock of {self._describe(previous)} (that process is gone)")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "user": _user(), "since": _now(),
                  "command": cli.command_line or sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _describe(owner: Mapping[str, Any]) -> str:
        if not owner:
            return "another process"
        return f"pid {owner.get('pid')} on {owner.get('host')} (user {owner.get('user')}, since {owner.get('since')})"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name for this uid (containers)
        return str(os.getuid())


# ----------------------------------------------------------------------------------------------------
# The run directory of one process


class RunDirectory:
    """A run directory held by this process: created if needed, locked, cleaned up after a failed start.

    Use as ``with RunDirectory(out, log=log) as rd: ...``. On leaving the block the lock is released; if
    the block raised and the directory holds no finished checkpoint (the start failed), the run entries
    are removed (and the directory itself if this process created it), so a retry needs nothing by hand.
    With ``write=False`` (processes other than process 0 of a multi-process run) nothing is created,
    locked or removed.
    """

    def __init__(self, out: str | os.PathLike, *, log: Callable[[str], None] = print, write: bool = True):
        self.out = pathlib.Path(out)
        self.log = log
        self.write = write
        self._lock = RunLock(self.out)
        self._created = False
        self._touched = False  # this process cleared or wrote entries
        self.status = "new"

    def __enter__(self) -> "RunDirectory":
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out: {out} exists and is not a directory; choose another --out")
        if self.write:
            try:
                out.mkdir(parents=True)
                self._created = True
            except FileExistsError:
                if not out.is_dir():
                    raise ConfigError(f"out: {out} exists and is not a directory; choose another --out") from None
            except OSError as err:
                raise ConfigError(f"out: cannot create run directory {out}: {err.strerror}") from None
            try:
                self._lock.acquire(self.log)
            except PermissionError as err:
                self._remove_if_created()
                raise ConfigError(f"out: cannot write in {out} ({err.strerror}); choose another --out") from None
        self.status = status(out)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.write:
            return
        try:
            # clean up after this start only: leftovers of an earlier failed start stay until a start succeeds
            if exc_type is not None and (self.status == "new" or self._touched):
                self.clear_failed_start(quiet=True)
        finally:
            self._lock.release()
            self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only when empty

    # -- checks (they change nothing on disk) -----------------------------------------------------------

    def check_new_start(self) -> None:
        """Raises ConfigError unless a new run may start here (new directory, or a failed start)."""
        if self.status == "started":
            raise ConfigError(
                f"out: {self.out} holds a run (checkpoints or intensities.h5); add --resume to continue it, "
                "or choose another --out (nothing was overwritten)"
            )
        if self.status == "foreign":
            raise ConfigError(
                f"out: run directory {self.out} is not empty and holds files that are not an emcjax run; "
                "choose another --out (nothing was overwritten)"
            )

    def saved_config(self, cls: type) -> Any:
        """The config the run was started with (``config.toml``), for ``--resume``."""
        path = self.out / runio.CONFIG_FILE
        if self.status == "foreign" or self.status == "new":
            raise ConfigError(
                f"resume: {self.out} holds no run to resume; drop --resume to start a new run or name the run "
                "directory with --out"
            )
        if not path.exists():
            raise ConfigError(
                f"resume: {path} is missing; it holds the settings the run was started with (run.json keeps a "
                "copy under 'starts'); restore it, then resume (nothing was changed)"
            )
        return toml_config.config_from_toml(cls, path)

    def provenance(self) -> dict:
        """The contents of ``run.json`` ({} when the run has none, e.g. a run of an older emcjax)."""
        path = self.out / PROVENANCE_FILE
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{path} is not readable JSON ({err}); restore it or start a new run") from None

    # -- writes (after every check passed) -----------------------------------------------------------------

    def clear_failed_start(self, quiet: bool = False) -> None:
        """Removes what a failed start left (only run entries; the lock stays)."""
        if not self.write or status(self.out) != "failed-start":
            return
        self._touched = True
        names = sorted(p.name for p in self.out.iterdir() if p.name != LOCK_FILE)
        for name in names:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if names and not quiet:
            self.log(f"{self.out}: removed what a start that never reached its first checkpoint left "
                     f"({', '.join(names)})")

    def record_start(self, config: Any, data: Mapping[str, Any] | None, *, header: str,
                     resumed_at: int | None, devices: list[str]) -> None:
        """Writes ``config.toml`` and appends this start (command line, versions, devices, data) to ``run.json``."""
        if not self.write:
            return
        self._touched = True
        toml_config.save_config(self.out / runio.CONFIG_FILE, config, header=header)
        record = self.provenance()
        record.setdefault("format", "emcjax-run-directory")
        if data is not None:
            record["data"] = dict(data)
        record.setdefault("starts", []).append({
            "time": _now(), "host": socket.gethostname(), "user": _user(), "pid": os.getpid(),
            "cwd": os.getcwd(), "command": cli.command_line or sys.argv, "python": sys.version.split()[0],
            "versions": package_versions(), "devices": devices, "resumed_at_iteration": resumed_at,
            "config": toml_config.config_to_dict(config),
        })
        atomic_files.write_text_atomic(self.out / PROVENANCE_FILE, json.dumps(record, indent=1) + "\n")


def package_versions() -> dict[str, str | None]:
    """Installed versions of emcjax and the packages its results depend on."""
    from importlib import metadata

    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ----------------------------------------------------------------------------------------------------
# Data set identity and resume checks


def data_identity(path: str | os.PathLike) -> dict:
    """What identifies a sparse data set: absolute path, size (bytes), frame count, photon-record count and
    the SHA-256 of its frame index (/frames/photon_offsets, int64)."""
    import numpy as np

    from emcjax.data import SparseDataset

    path = pathlib.Path(path).absolute()
    with SparseDataset(path) as dataset:
        offsets = np.ascontiguousarray(dataset.photon_offsets, dtype="<i8")
        n_frames = int(dataset.n_frames)
    return {"path": os.fspath(path), "size": path.stat().st_size, "n_frames": n_frames,
            "photons": int(offsets[-1]) if offsets.size else 0,
            "frame_index_sha256": hashlib.sha256(offsets.tobytes()).hexdigest()}


def check_same_data(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], what: str,
                    log: Callable[[str], None]) -> None:
    """Raises DataError if ``current`` (``data_identity``) is not the data set ``recorded``; ``what`` names
    the run the record comes from (e.g. ``resume: run r1``). Without a record (older runs) it only logs."""
    if not recorded:
        log(f"warning: {what} records no data set identity (made by an older emcjax); not checked")
        return
    keys = ("size", "n_frames", "frame_index_sha256")
    if any(recorded.get(k) != current.get(k) for k in keys):
        raise DataError(
            f"{what} was made with data set {recorded.get('path')} ({recorded.get('n_frames')} frames, "
            f"{recorded.get('size')} bytes, frame index sha256 {str(recorded.get('frame_index_sha256'))[:12]}), "
            f"not with {current['path']} ({current['n_frames']} frames, {current['size']} bytes, "
            f"sha256 {current['frame_index_sha256'][:12]}); use that data set, or start a new run"
        )
    if recorded.get("path") != current["path"]:
        log(f"note: data set moved: {recorded.get('path')} -> {current['path']} (same size and frame index)")


def check_resume_config(saved: Any, config: Any, may_change: set[str], out: pathlib.Path) -> None:
    """Raises ConfigError listing every setting of ``config`` that differs from the run's ``saved`` config,
    except the dotted names in ``may_change`` (and their sub-fields)."""

    def allowed(name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in may_change)

    changed = {k: v for k, v in toml_config.config_differences(config, saved).items() if not allowed(k)}
    if changed:
        listed = ", ".join(f"{k} = {v[0]!r} (the run has {v[1]!r})" for k, v in changed.items())
        raise ConfigError(
            f"resume: {listed}: a resumed run keeps the settings it was started with ({out / runio.CONFIG_FILE}); "
            f"to change them start a new run, e.g. with --init-from {out} (nothing was changed)"
        )


def absolute(config: Any, *fields: str) -> Any:
    """``config`` with the given path fields made absolute (so a run resumes from any directory)."""
    values = {f: pathlib.Path(getattr(config, f)).absolute() for f in fields if getattr(config, f) is not None}
    return dataclasses.replace(config, **values)
