"""Devices and hosts: the mesh, multi-process start-up and global arrays built from per-device pieces.

Frames are split over one mesh axis, ``AXIS``; every per-frame array of a block is stacked with a leading
device axis of length ``mesh.size`` and sharded over it, so that a kernel run under ``jax.shard_map`` sees
only the frames of its device and ends every sum over frames with ``jax.lax.psum(..., AXIS)``. The same
code runs on one CPU, on 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on
GPUs and on many hosts (``jax.distributed``): each process builds the pieces of its own devices only.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from emcjax.errors import ConfigError

AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Starts a multi-process run through ``jax.distributed.initialize``.

    Arguments left ``None`` come from the environment (``EMCJAX_COORDINATOR``, ``EMCJAX_NUM_PROCESSES``,
    ``EMCJAX_PROCESS_ID``), then from JAX's own detection (SLURM, Open MPI, cloud TPU). Does nothing when no
    coordinator is given and none can be detected with a single process.
    """
    coordinator_address = coordinator_address or os.environ.get("EMCJAX_COORDINATOR")
    if num_processes is None and "EMCJAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["EMCJAX_NUM_PROCESSES"])
    if process_id is None and "EMCJAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["EMCJAX_PROCESS_ID"])
    if coordinator_address is None and num_processes in (None, 1):
        return
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh over ``devices`` (default: every device of every process), Auto axis type."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def local_positions(mesh: Mesh) -> list[int]:
    """Positions along the mesh axis of the devices this process drives, ascending."""
    me = jax.process_index()
    return [i for i, d in enumerate(mesh.devices.ravel()) if d.process_index == me]


def stack(mesh: Mesh, pieces: Sequence[np.ndarray]) -> jax.Array:
    """Global ``(mesh.size, *piece.shape)`` array sharded over the mesh from this process's pieces.

    Args:
      mesh: the mesh.
      pieces: one array per local device (in :func:`local_positions` order), all of one shape and dtype.
    """
    devices = mesh.devices.ravel()
    positions = local_positions(mesh)
    if len(pieces) != len(positions):
        raise ValueError(f"stack: {len(pieces)} pieces for {len(positions)} local devices")
    shape = (mesh.size, *np.shape(pieces[0]))
    arrays = [jax.device_put(np.asarray(p)[None], devices[i]) for p, i in zip(pieces, positions)]
    return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, P(AXIS)), arrays)


def stack_tree(mesh: Mesh, trees: Sequence):
    """:func:`stack` applied leaf by leaf to one pytree per local device."""
    return jax.tree.map(lambda *leaves: stack(mesh, leaves), *trees)


def replicate(mesh: Mesh, value) -> jax.Array:
    """The same host value on every device of the mesh (every process must pass the same value)."""
    value = np.asarray(value)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), value, value.shape)


def host_array(array: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) global array as numpy, on every process."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def local_pieces(array: jax.Array) -> list[np.ndarray]:
    """This process's pieces of a stacked array, leading axis removed, in :func:`local_positions` order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
    return [np.asarray(s.data)[0] for s in shards]


def global_max(value: int) -> int:
    """The maximum of an integer over all processes (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def global_union(values: np.ndarray) -> np.ndarray:
    """Sorted union of 1-D integer arrays over all processes (a collective)."""
    values = np.unique(np.asarray(values, np.int64))
    if jax.process_count() == 1:
        return values
    n = global_max(values.shape[0])
    padded = np.concatenate([values, np.full(n - values.shape[0], -1, np.int64)])
    gathered = np.asarray(multihost_utils.process_allgather(padded)).ravel()
    return np.unique(gathered[gathered >= 0])


def gather_frames(mesh: Mesh, values: Sequence[np.ndarray], starts: Sequence[int], n_total: int) -> np.ndarray:
    """Assembles per-frame values of this process's devices into the full ``(n_total, ...)`` array.

    Args:
      mesh: the mesh.
      values: per local device, the values of its frames.
      starts: per local device, the global index of its first frame.
      n_total: the number of frames.
    """
    first = np.asarray(values[0])
    out = np.zeros((n_total, *first.shape[1:]), first.dtype)
    for v, s in zip(values, starts):
        v = np.asarray(v)
        out[s : s + v.shape[0]] = v[: max(0, min(v.shape[0], n_total - s))]
    if jax.process_count() > 1:
        parts = multihost_utils.process_allgather(out)
        out = parts.sum(axis=0) if out.dtype.kind != "b" else parts.any(axis=0)
    return out
