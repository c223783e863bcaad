"""Orbax checkpoints of a run's state in ``RUN/checkpoints/``: save every iteration, restore the newest one
that reads back, falling back to older ones when the newest is damaged.

A checkpoint holds a state pytree (e.g. ``emcjax.EMCState``: iteration, intensity, phi) and a small JSON
``meta`` dict (frames, model shape, data set). Orbax writes each step to a temporary directory and renames
it when complete, so a process killed while writing leaves the previous steps intact; a step that was
completed and later damaged (truncated or deleted files) is detected on restore, moved to
``RUN/checkpoints-damaged/`` with a warning, and the next older step is used.

Runners (lowres, and later highres, reject, pipeline) use ``open_manager``, ``save``, ``restore_latest``
and ``complete_steps``.
"""

from __future__ import annotations

import os
import pathlib
import re
import time
from typing import Any, Callable

from emcjax.errors import DataError

CHECKPOINTS_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints-damaged"
ASYNC = True


def complete_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the finished checkpoints in ``run_dir/checkpoints`` (directories named by an integer;
    Orbax's temporary directories of an interrupted write are not counted), ascending. No JAX needed."""
    directory = pathlib.Path(run_dir) / CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def open_manager(run_dir: str | os.PathLike, keep: int):
    """An Orbax ``CheckpointManager`` on ``run_dir/checkpoints`` keeping the ``keep`` newest steps (creates
    the directory). Close it with ``manager.close()`` (waits for a save still being written)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=ASYNC)
    return ocp.CheckpointManager((pathlib.Path(run_dir) / CHECKPOINTS_DIR).absolute(), options=options)


def _leaves(state: Any) -> dict[str, Any]:
    """The array leaves of a state pytree by their path (``intensity``, ``hyper_prune_mass``, ...)."""
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {re.sub(r"\W+", "_", jax.tree_util.keystr(path)).strip("_") or "leaf": leaf for path, leaf in flat}


def save(manager, state: Any, meta: dict) -> None:
    """Saves ``state`` (a pytree of arrays with an ``iteration`` field, the step) and ``meta`` (JSON).

    The write continues in the background; a failure of it (or of the previous one) raises DataError here
    or in ``finish``."""
    import orbax.checkpoint as ocp

    try:
        manager.save(
            int(state.iteration),
            args=ocp.args.Composite(state=ocp.args.StandardSave(_leaves(state)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
    except Exception as err:
        raise _write_error(err, manager) from None


def close(manager) -> None:
    """Waits for the last write and closes the manager (DataError if a write failed)."""
    try:
        manager.close()
    except Exception as err:
        raise _write_error(err, manager) from None


def finish(manager) -> None:
    """Waits until the last checkpoint is written (DataError if writing it failed)."""
    try:
        manager.wait_until_finished()
    except Exception as err:
        raise _write_error(err, manager) from None


_FULL = ("os_error_code='28'", "os_error_code='27'", "os_error_code='122'", "No space left", "File too large")


def _write_error(err: Exception, manager) -> DataError:
    reason = " ".join(str(err).split())
    hint = ""
    if isinstance(err, OSError) and err.errno is not None:
        reason = f"{err.filename or ''}: {err.strerror}".lstrip(": ")
    if any(marker in str(err) for marker in _FULL):
        hint = " (the disk, quota or file-size limit is full; free space, then resume with --resume)"
    return DataError(f"checkpoint: writing in {manager.directory} failed: {reason[:400]}{hint}")


def _restore_step(manager, step: int, template: Any, directory: pathlib.Path) -> tuple[Any, dict]:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    leaves = _leaves(template)
    abstract = {
        name: jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x),
                                   sharding=getattr(x, "sharding", None))
        for name, x in leaves.items()
    }
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    for name, expected in leaves.items():
        value = restored["state"][name]
        if np.shape(value) != np.shape(expected):
            raise DataError(
                f"checkpoint {step} in {directory} has {name} of shape {np.shape(value)}, this problem needs "
                f"{np.shape(expected)}; was the run made with other --data or --emc settings?"
            )
    state = jax.tree.unflatten(jax.tree.structure(template), [restored["state"][name] for name in leaves])
    return state, dict(restored["meta"] or {})


def restore_latest(
    manager, template: Any, run_dir: str | os.PathLike, log: Callable[[str], None] = print
) -> tuple[Any, dict]:
    """Restores the newest checkpoint that reads back into the shapes, dtypes and shardings of ``template``.

    A step that cannot be read (truncated, deleted or corrupt files) is reported with a warning, moved to
    ``run_dir/checkpoints-damaged/STEP-TIME`` and the next older step is tried.

    Returns:
      (state, meta) of the restored step.

    Raises:
      DataError: no checkpoint at all, every checkpoint is damaged, or a checkpoint's arrays have other
        shapes than ``template`` (another data set or model; nothing is moved then).
    """
    run_dir = pathlib.Path(run_dir)
    directory = run_dir / CHECKPOINTS_DIR
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise DataError(f"no checkpoint in {directory}")
    damaged: list[tuple[int, str]] = []
    for step in steps:
        try:
            state, meta = _restore_step(manager, step, template, directory)
        except DataError:
            raise
        except Exception as err:  # Orbax / TensorStore report damage with many exception types
            reason = " ".join(str(err).split())[:300]
            log(f"warning: checkpoint {step} in {directory} cannot be read ({type(err).__name__}: {reason}); "
                "trying the previous one")
            damaged.append((step, reason))
            continue
        for bad, _ in damaged:
            _set_aside(directory / str(bad), run_dir / DAMAGED_DIR, log)
        if damaged:
            manager.reload()
        return state, meta
    listed = "; ".join(f"{s}: {r}" for s, r in damaged)
    raise DataError(f"none of the checkpoints in {directory} can be read ({listed}); start a new run")


def _set_aside(step_dir: pathlib.Path, damaged_dir: pathlib.Path, log: Callable[[str], None]) -> None:
    """Moves a damaged step out of Orbax's directory (so that step can be written again), keeping it."""
    damaged_dir.mkdir(exist_ok=True)
    target = damaged_dir / f"{step_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    os.replace(step_dir, target)
    log(f"warning: moved the damaged checkpoint {step_dir} to {target}")
