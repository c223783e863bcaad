"""A streamed iteration at O(block) memory (``EMCConfig.stream`` with a full search on one process).

Two passes over the frames, each block read from disk once per pass (the next block read by a worker thread
while the devices work on the current one):

0. Set-up (:func:`cache_block`): every block's join is built once (emcjax.join) and cached on disk as int32
   columns with a CRC-32 (:class:`JoinCache`); an E-step reads the block's records and cached columns and
   fills the join in on the device (emcjax.core.stream.cached_join, one compiled shape).
1. E-step with the current model (emcjax.core.step.estep_block, as in memory); the block's kept pairs reduce
   at once to the intensity update's statistics: per-rotation and per-entry exposure sums (added on the
   device) and the kept photon terms, appended to files on disk grouped by entry (emcjax.stream_solve.TermStore).
2. The intensity update, entry group by entry group (the per-entry Newton solve of
   emcjax.core.mstep.reference_update, or the MLEM ratio sums): each group's terms are read back whole.
3. E-step with the new model; each block's phi (and background scale) update runs on its own kept pairs
   (they are per-frame), then the mean-1 normalisation.

Nothing the size of all frames x kept rotations x photons is held: per block the records, the join and the
kept pairs; per run the per-entry sums and per-frame arrays. The results are those of the in-memory run
(emcjax.emc's fused step) up to the order of float sums over blocks (the E-step's join and kept pairs are the
in-memory ones; per-device exposure sums and each entry's photon terms are summed in the same order).

Other streamed runs (candidate lists, several processes, the gradient M-step, a likelihood other than
Poisson) take emcjax.emc's host iteration, which holds every block's kept pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import shutil
import tempfile
import time
import weakref
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from emcjax import heap, parallel
from emcjax.blocks import Block, Plan, pad_photons, frame_arrays
from emcjax.core import background as background_lib
from emcjax.core import mstep
from emcjax.core.arrays import BlockArrays, EMCState, PhotonArrays
from emcjax.core.estep import rotation_tables
from emcjax.core.step import Diagnostics, FrameStats, KeptRotations, StepSpec, estep_block
from emcjax.core.stream import CachedJoin, IntensitySums, Records, cached_join, intensity_statistics
from emcjax.data import bucket_length
from emcjax.errors import DataError
from emcjax.join import BACKGROUND_FLOOR, all_rotations_join
from emcjax.stream_solve import TermStore, solve_intensity



def applies(problem, spec: StepSpec, likelihood) -> bool:
    """Whether ``problem`` streams a full search that this module runs (module docstring)."""
    return (
        problem.stream and problem.batch is None and problem.rotation_set is not None
        and problem.plan.candidates is None and jax.process_count() == 1
        and spec.intensity_update in ("reference", "mlem") and getattr(likelihood, "poisson_counts", False)
        and (spec.update_phi or not spec.refine_background) and problem.plan in _CACHES
    )


class RecordBlock(NamedTuple):
    """What the host sends of one block (stacked over devices): per-frame arrays, pixel records, cached join."""

    frame_start: jax.Array
    real: jax.Array  # (n_local,) bool: a frame of the data (not padding)
    masked_shells: jax.Array
    background: jax.Array
    weight: jax.Array
    photons: PhotonArrays
    records: Records
    join: CachedJoin
    cell_offsets: jax.Array


class JoinCache:
    """Every block's join, built once (emcjax.join.all_rotations_join) and kept on disk as int32 columns
    (cell, entry, record, each padded to the bucketed length of the block's pairs, then the CSR offsets by cell), one file per block and device, with its CRC-32 checked at
    every read. The directory (under ``TMPDIR``, named with the process id) is removed with the plan it
    belongs to; directories left by killed processes (their pid no longer runs) are removed at the next
    set-up (:func:`remove_stale_caches`)."""

    def __init__(self, plan: Plan):
        remove_stale_caches()
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-"))
        self.files: dict[tuple[int, int], tuple[int, int]] = {}  # (first frame, position) -> (pairs, crc32)
        weakref.finalize(plan, shutil.rmtree, self.directory, True)

    def path(self, start: int) -> pathlib.Path:
        return self.directory / f"frames{start:010d}.i32"

    def write(self, start: int, cell, entry, record, offsets) -> None:
        """Writes the columns padded to the bucketed length of this block's pairs (padding as
        :meth:`read` returns it), so that a read needs no copy when every block has that length."""
        n, n_cells = int(cell.shape[0]), int(offsets.shape[0]) - 1
        stored = bucket_length(max(n, 1))
        data = np.empty(3 * stored + n_cells + 1, np.int32)
        for k, (column, fill) in enumerate(((cell, n_cells - 1), (entry, 0), (record, 0))):
            data[k * stored : k * stored + n] = column
            data[k * stored + n : (k + 1) * stored] = fill
        data[3 * stored :] = offsets
        data.tofile(self.path(start))
        self.files[start] = (n, stored, zlib.crc32(data))

    def read(self, start: int, length: int, n_cells: int) -> tuple[CachedJoin, np.ndarray]:
        """A device part's cached join padded to ``length`` pairs, and its cell offsets (views of the file's
        pages, no copy, unless the block's stored length is below ``length``)."""
        n, stored, crc = self.files[start]
        data = np.memmap(self.path(start), np.int32, mode="r")
        if data.shape[0] != 3 * stored + n_cells + 1 or zlib.crc32(data) != crc:
            raise DataError(f"{self.path(start)}: the cached join of the block at frame {start} is damaged "
                            f"(size or CRC-32 differs from what set-up wrote); rerun the set-up")
        columns = [data[k * stored : (k + 1) * stored] for k in range(3)]
        if stored < length:
            columns = [np.concatenate([c, np.full(length - stored, fill, np.int32)])
                       for c, fill in zip(columns, (n_cells - 1, 0, 0))]
        return CachedJoin(*columns, np.int32(n)), data[3 * stored :]


CACHE_PREFIX = "emcjax-joins-"
OLD_CACHE_NAME = re.compile(re.escape(CACHE_PREFIX) + r"[a-z0-9_]{8}")
"""Join caches of versions before the pid naming (``tempfile.mkdtemp(prefix=CACHE_PREFIX)``: no pid in the name)."""


def remove_stale_caches(directory: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Removes the join caches under ``directory`` (default ``TMPDIR``) whose process no longer runs (a
    killed run cannot remove its own); returns what was removed.

    Caches of older versions carry no pid in their name (:data:`OLD_CACHE_NAME`): such a directory is removed
    when no process of its owner that runs Python started before the directory was last modified (its
    creator started before it, and emcjax runs in Python), judged from ``/proc`` (kept where there is none)."""
    directory = pathlib.Path(directory or tempfile.gettempdir())
    removed = []
    for path in directory.glob(f"{CACHE_PREFIX}*"):
        if OLD_CACHE_NAME.fullmatch(path.name) and path.is_dir():
            stat = path.stat()
            if _python_started_before(stat.st_mtime, stat.st_uid) is False:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    for path in directory.glob(f"{CACHE_PREFIX}*-*"):
        pid = path.name[len(CACHE_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or not path.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:  # another user's live process
            pass
    return removed


def _python_started_before(when: float, uid: int) -> bool | None:
    """Whether a process of user ``uid`` that runs Python (``python`` in its command line or executable) started
    at or before ``when`` (seconds since the epoch); None where ``/proc`` does not tell (not Linux)."""
    proc = pathlib.Path("/proc")
    try:
        boot = next(float(line.split()[1]) for line in (proc / "stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            command = (entry / "cmdline").read_bytes().lower()
            if b"python" not in command and "python" not in os.readlink(entry / "exe").lower():
                continue
            # field 22 of /proc/PID/stat: start time in clock ticks after boot (fields counted after "(comm)")
            start = boot + int((entry / "stat").read_text().rsplit(")", 1)[1].split()[19]) / tick
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if start <= when + 1.0:  # btime is whole seconds
            return True
    return False


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SECONDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def phase_seconds(problem) -> dict:
    """Seconds of the last streamed iteration's phases: ``estep_intensity`` (first pass: E-step and the
    intensity statistics), ``intensity`` (the solve), ``estep_phi`` (second pass: E-step and phi)."""
    return dict(_SECONDS.get(problem, {}))


def _part(plan: Plan, start: int, n_local: int):
    """One device part of a full-search block: (frames, per-frame arrays and records of frame_arrays)."""
    frames = plan.source.read(start, start + n_local)
    return frames, frame_arrays(plan, frames, start, n_local)


def cache_block(plan: Plan, block: Block) -> tuple[int, int]:
    """Builds ``block``'s join (every device part of this process), writes it to the plan's cache and returns
    (join pairs, pixel records) of its largest part, bucketed and maximised over processes as
    emcjax.blocks.build_block pads them."""
    heap.steady_heap()  # set-up too builds and frees one block-sized join after another
    cache = _CACHES.get(plan)
    if cache is None:
        cache = _CACHES[plan] = JoinCache(plan)
    most = (1, 1)
    for i in parallel.local_positions(plan.mesh):
        start = block.start + i * block.n_local
        _, arrays = _part(plan, start, block.n_local)
        records = arrays[3]
        cell, entry, record, offsets = all_rotations_join(records, plan.rotation_set.index, block.n_local * plan.n_slots)
        cache.write(start, cell, entry, record, offsets)
        most = max(most[0], cell.shape[0]), max(most[1], records.pixel.shape[0])
    return tuple(parallel.global_max(bucket_length(n)) for n in most)


def _record_block(plan: Plan, block: Block, lengths: tuple[int, int]) -> RecordBlock:
    n_local = block.n_local
    cache = _CACHES[plan]
    parts = []
    for i in parallel.local_positions(plan.mesh):
        start = block.start + i * n_local
        frames, (masked, background, weight, rec, photons) = _part(plan, start, n_local)
        pad = lengths[1] - rec.pixel.shape[0]
        real = np.arange(n_local) < frames.n_frames
        records = Records(
            np.concatenate([rec.pixel, np.zeros(pad, np.int64)]).astype(np.int32),
            np.concatenate([np.maximum(rec.background, BACKGROUND_FLOOR), np.ones(pad)]).astype(np.float32),
            np.array([rec.pixel.shape[0] - int(rec.dead.sum()), rec.pixel.shape[0]], np.int32),  # dead: last
        )
        join, offsets = cache.read(start, lengths[0], n_local * plan.n_slots)
        parts.append(RecordBlock(np.int32(start), real, masked, background, weight,
                                 pad_photons(photons, lengths[1], n_local), records, join, offsets))
    return parallel.stack_tree(plan.mesh, parts)


def _record_blocks(problem):
    """Yields (block, RecordBlock); the next block is read by a worker thread while the caller uses this one."""
    return heap.prefetched(functools.partial(_record_block, problem.plan, lengths=problem.lengths), problem.blocks)


def _squeeze(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _expand(tree):
    return jax.tree.map(lambda x: x[None], tree)


def _local_estep(tables, phi, state, shared, block: RecordBlock, spec: StepSpec, n_slots: int):
    n_local = block.weight.shape[0]
    local = BlockArrays(
        frame_start=block.frame_start,
        candidates=jnp.broadcast_to(jnp.arange(n_slots, dtype=jnp.int32), (n_local, n_slots)),
        candidate_mask=jnp.broadcast_to(block.real[:, None], (n_local, n_slots)),
        join=cached_join(block.join, block.records, block.photons, shared.polarization),
        cell_offsets=block.cell_offsets, masked_shells=block.masked_shells,
        background=block.background, weight=block.weight, photons=block.photons,
    )
    return estep_block(tables, phi, state, shared, local, spec)


@functools.lru_cache(maxsize=None)
def _intensity_pass_kernel(mesh: Mesh, spec: StepSpec, n_slots: int):
    """One block of the first pass: E-step, kept pairs -> the intensity statistics (per device)."""

    def local(tables, phi, state, shared, block, sums):
        kept, n_live, stats = _local_estep(tables, phi, state, shared, _squeeze(block), spec, n_slots)
        sums, terms = intensity_statistics(_squeeze(sums), phi, state.likelihood, kept)
        pairs = (kept.pair_frame, kept.pair_rotation, kept.pair_prob)
        return _expand(sums), _expand(terms), n_live[None], _expand(stats), _expand(pairs)

    specs = (P(), P(), P(), P(), P(parallel.AXIS), P(parallel.AXIS))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(parallel.AXIS), check_vma=False),
                   donate_argnums=5)


@functools.lru_cache(maxsize=None)
def _phi_pass_kernel(mesh: Mesh, spec: StepSpec, n_slots: int):
    """One block of the second pass: E-step with the new model, then phi (and the background scale) of the
    block's frames; frames of other blocks keep the values of ``new_phi`` / ``scale``."""

    def local(tables, intensity, phi, state, shared, block, new_phi, used, scale, totals):
        block = _squeeze(block)
        kept, n_live, stats = _local_estep(tables, phi, state, shared, block, spec, n_slots)
        # phi of this device's frames only (frame indices made local: per-frame sums over n_local frames, not
        # over all frames at every Newton step), then placed among all frames and summed over the mesh
        start, n_local = block.frame_start, block.weight.shape[0]
        mine = kept._replace(frame=kept.frame - start, pair_frame=kept.pair_frame - start)
        phi_here, used_here = mstep.phi_update(intensity, jax.lax.dynamic_slice(new_phi, (start,), (n_local,)),
                                               state.likelihood, mine, shared, spec.n_shells, tables=tables,
                                               until_fixed=True)
        placed = jnp.zeros((2, new_phi.shape[0]), new_phi.dtype)
        placed = jax.lax.dynamic_update_slice(placed, jnp.stack([jnp.where(used_here, phi_here, 0.0),
                                                                 used_here.astype(new_phi.dtype)]), (0, start))
        placed = jax.lax.psum(placed, parallel.AXIS)
        used_here = placed[1] > 0
        new_phi = jnp.where(used_here, placed[0], new_phi)
        if spec.refine_background:
            scale = background_lib.scale_update(intensity, new_phi, scale, kept, shared, *totals, axis=parallel.AXIS)
        pairs = (kept.pair_frame, kept.pair_rotation, kept.pair_prob)
        return new_phi, used | used_here, scale, n_live[None], _expand(stats), _expand(pairs)

    specs = (P(), P(), P(), P(), P(), P(parallel.AXIS), P(), P(), P(), P())
    out = (P(), P(), P(), P(parallel.AXIS), P(parallel.AXIS), P(parallel.AXIS))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False))


def _fill_stats(stats: np.ndarray, problem, block: Block, values) -> None:
    """Per-frame E-step results of one block into (4, n_padded) ``stats`` (best rotation: sampling index)."""
    rotations = problem.rotation_set.rotations
    for row, v in enumerate(values):
        for i, piece in zip(parallel.local_positions(problem.mesh), parallel.local_pieces(v)):
            first = block.start + i * block.n_local
            stats[row, first : first + piece.shape[0]] = rotations[piece] if row == 2 else piece


def _live_pairs(problem, pairs) -> KeptRotations:
    frame, rotation, prob = (np.asarray(x).ravel() for x in pairs)
    live = prob > 0
    return KeptRotations(frame[live], problem.rotation_set.rotations[rotation[live]], prob[live])


def iteration(problem, state: EMCState, spec: StepSpec, overflow) -> tuple[EMCState, Diagnostics]:
    """One streamed iteration (module docstring); ``overflow(needed)`` is raised when a block kept more join
    pairs than ``spec.kept_budget`` (the caller reruns with a larger budget)."""
    mesh, n_slots = problem.mesh, problem.n_slots
    shared = problem.shared
    n_pad = problem.n_padded - problem.n_frames
    phi = jnp.pad(state.phi, (0, n_pad))
    seconds = {}

    def check(n_live):
        needed = int(np.max(np.asarray(n_live)))
        problem.kept_needed = max(problem.kept_needed, needed)
        if spec.kept_budget is not None and needed > spec.kept_budget:
            raise overflow(needed)

    start = time.perf_counter()
    first = np.zeros((4, problem.n_padded))
    tables = rotation_tables(state.intensity, shared, problem.n_shells)
    kernel = _intensity_pass_kernel(mesh, spec, n_slots)
    n_entries = shared.entries.rotation.shape[0]
    sums = parallel.stack_tree(mesh, [IntensitySums.zeros(shared.entries.n_rot, problem.n_shells, n_entries)
                                      for _ in parallel.local_positions(mesh)])
    pieces = []
    with tempfile.TemporaryDirectory(prefix="emcjax-terms-") as directory:
        store = TermStore(pathlib.Path(directory), max(len(problem.blocks), 1))
        for block, data in _record_blocks(problem):
            sums, terms, n_live, stats, pairs = kernel(tables, phi, state, shared, data, sums)
            check(n_live)
            store.add(terms)
            _fill_stats(first, problem, block, stats)
            pieces.append(_live_pairs(problem, pairs))
        seconds["estep_intensity"] = time.perf_counter() - start
        start = time.perf_counter()
        intensity = jax.block_until_ready(solve_intensity(problem, spec, state.intensity, sums, store))
        seconds["intensity"] = time.perf_counter() - start
    del sums
    last, likelihood = first, state.likelihood
    if spec.update_phi:
        start = time.perf_counter()
        last = np.zeros((4, problem.n_padded))
        tables = rotation_tables(intensity, shared, problem.n_shells)
        kernel = _phi_pass_kernel(mesh, spec, n_slots)
        new_phi, used = phi, jnp.zeros(problem.n_padded, bool)
        scale = jnp.broadcast_to(jnp.asarray(getattr(likelihood, "scale", 1.0), phi.dtype), (problem.n_frames,))
        totals = tuple(parallel.replicate(mesh, np.pad(x, (0, n_pad)).astype(np.float32))
                       for x in (problem.photons, problem.expected_background))
        pieces = []
        for block, data in _record_blocks(problem):
            new_phi, used, scale, n_live, stats, pairs = kernel(tables, intensity, phi, state, shared, data, new_phi,
                                                                used, scale, totals)
            check(n_live)
            _fill_stats(last, problem, block, stats)
            pieces.append(_live_pairs(problem, pairs))
        intensity, phi = mstep.normalise_phi(intensity, new_phi, used)
        if spec.refine_background:
            likelihood = dataclasses.replace(likelihood, scale=scale)
        seconds["estep_phi"] = time.perf_counter() - start
    kept_pairs = KeptRotations(*(np.concatenate(x) for x in zip(*pieces)))
    _SECONDS[problem] = seconds
    new = state._replace(iteration=state.iteration + 1, intensity=intensity, phi=phi[: problem.n_frames],
                         likelihood=likelihood)
    return new, Diagnostics(first=FrameStats(*first), last=FrameStats(*last), n_live=0, kept=kept_pairs)
