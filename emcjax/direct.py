"""Candidate mode by direct photon-peak tests (host side): set-up and one iteration (the plan and the blocks' data:
emcjax.direct_blocks).

The table path (emcjax.problem / blocks / join) builds the in-peak entries of every block's candidate union
and joins the photons with them on the host. With a few hundred candidates per frame on a fine grid almost
every candidate belongs to one frame, and those entries cost far more than the photons that use them. This
path instead keeps, per block, only the frames' photon records and their candidates' quaternions; the
E-step tests every (record, candidate) pair on the device (emcjax.core.direct) and sums each candidate's
expected signal from the reflections near the Ewald sphere, never storing entries. The M-steps are the
table path's: for the reference intensity update and the closed-form phi update they run on the touched
entries only (the distinct (kept rotation, pixel) of the kept records, whose in-peak test the E-step already
made), every other in-peak entry of the kept rotations entering as exposure back-projected straight from
the reflections (emcjax.core.direct_mstep, emcjax.direct_kept.direct_kept); other updates get the kept
rotations' in-peak entries built after each E-step (emcjax.direct_kept.kept_from_direct, the table path's
own hand-off, emc._reindex_kept, without the per-block entry tables).

:func:`emcjax.candidate_path.choose_path` decides between the two paths by a cost estimate
(docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from emcjax import model as model_lib
from emcjax import parallel
from emcjax.blocks import rotation_set
from emcjax.config import EMCConfig
from emcjax.core import cut_signal
from emcjax.core import direct as kernels
from emcjax.core import direct_mstep, packed_photons
from emcjax.core.arrays import EMCState
from emcjax.core.estep import local_phi
from emcjax.core.step import Diagnostics, FrameStats, KeptRotations, StepSpec
from emcjax.data import SparseDataset, SparseFrames, bucket_length
from emcjax.direct_blocks import SHARED_ENTRIES, SIGNAL_CHUNK, DirectBlockData, DirectPlan, bucket_hits
from emcjax.direct_blocks import build_direct_block
from emcjax.direct_kept import BlockPairs, direct_kept, kept_from_direct
from emcjax.errors import ConfigError
from emcjax.problem import Problem, frame_photon_counts, geometry_setup, replicated_geometry
from emcjax.rotations import crystal_from_lab
from emcjax.sampling_index import SampledRotations


@dataclasses.dataclass(eq=False)
class DirectProblem(Problem):
    """A :class:`~emcjax.problem.Problem` whose blocks are direct-path blocks (``direct_blocks``);
    ``emc.iterate`` runs it through :func:`iteration`."""

    direct_plan: DirectPlan | None = None
    direct_blocks: list | None = None
    seconds: dict = dataclasses.field(default_factory=dict)
    cpu_seconds: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def shared(self):
        """Entries of block 0's rotations, at most ``SHARED_ENTRIES`` of them (the first rotations): what scales
        the initial model (the table path uses all of block 0's rotations)."""
        rotations = np.unique(self.direct_blocks[0].rotations)
        plan = self.direct_plan
        proj = plan.projection[0]
        near = np.asarray(model_lib.near_sphere_counts(jnp.asarray(plan.sampling.quaternions[rotations[:1]], jnp.float32), proj))
        pixels_per_peak = plan.projection[2] ** 2 / 2.0  # about the in-peak pixels of one reflection
        rotations = rotations[: max(1, int(SHARED_ENTRIES / max(near[0] * pixels_per_peak, 1.0)))]
        return rotation_set(self.mesh, self.grid, self.detector, plan.sampling, plan.log_w, rotations,
                            pad=True).shared(self.geometry)

    def iteration(self, state: EMCState, spec: StepSpec):
        return iteration(self, state, spec)

    def data_blocks(self):
        """Yields every block (rebuilt from the frames when streaming)."""
        for block in self.direct_blocks:
            if block.arrays is not None:
                yield block
            else:
                yield build_direct_block(self.direct_plan, block.start, block.n_local)[0]


def setup_direct(dataset: SparseDataset, config: EMCConfig, frames: SparseFrames | None = None, *, mesh=None,
                 frame_weights=None, sampling=None, sampling_n: int | None = None,
                 signal: str | None = None) -> DirectProblem:
    """Set-up of the direct path for frames with candidate lists (one device): geometry, the frames' records
    and candidate quaternions per block; no in-peak entries.

    ``sampling``: the rotations candidate indices refer to; anything whose ``quaternions`` and ``log_weights``
    can be indexed by sampling index. Default: the 600-cell sampling of parameter ``sampling_n`` (default the
    data set's ``candidate_sampling_n``) by index (emcjax.sampling_index: only the rotations used are built). ``signal``: "exact" (the table path's S, summed over every in-peak pixel) or
    "tabulated" (cut integrals, emcjax.core.cut_signal: for detectors whose peaks span many pixels).
    """
    signal = config.candidate_signal if signal is None else signal
    if signal not in ("exact", "tabulated"):
        raise ConfigError(f"signal must be 'exact' or 'tabulated', got {signal!r}")
    mesh = parallel.make_mesh() if mesh is None else mesh
    if mesh.size != 1:
        raise ConfigError(f"the direct candidate path runs on one device; the mesh has {mesh.size}")
    source, _, detector, grid, weights = geometry_setup(dataset, config, frames, frame_weights)
    candidates = source.candidates()
    if candidates is None:
        raise ConfigError(f"{dataset.path}: the direct path needs candidate lists (/frames/candidate_offsets)")
    offsets, rotation_ids = (np.asarray(x, np.int64) for x in candidates)
    if sampling is None:
        sampling = SampledRotations(int(dataset.candidate_sampling_n if sampling_n is None else sampling_n))
    if int(rotation_ids.max(initial=0)) >= sampling.n_rot:
        raise ConfigError(f"{dataset.path}: candidate rotation {int(rotation_ids.max())} is outside the sampling "
                          f"of {sampling.n_rot} rotations")
    log_w = sampling.log_weights
    n_frames = source.n_frames
    n_slots = max(int(np.diff(offsets).max()), 1)
    background = source.background()
    geometry_arrays = replicated_geometry(mesh, detector, grid)
    geometry = kernels.Geometry(
        polarization=jnp.asarray(detector.polarization, jnp.float32), shell=jnp.asarray(detector.shell, jnp.int32),
        tables=grid.tables, q_lab=jnp.asarray(detector.q, jnp.float32),
    )
    plan = DirectPlan(source, detector, grid, sampling, log_w, (offsets, rotation_ids), n_slots,
                      max(int((background < 0).sum(axis=1).max()), 1), None, background, weights, geometry,
                      model_lib.projection_setup(grid, detector), signal,
                      cut_signal.cut_geometry(grid, detector) if signal == "tabulated" else None)
    per_block = n_frames if config.block_frames == 0 else min(config.block_frames, n_frames)
    n_blocks = math.ceil(n_frames / per_block)
    longest = max(_longest_frame(plan, b * per_block, per_block) for b in range(n_blocks))
    plan = dataclasses.replace(plan, n_records=bucket_length(max(longest, 1)))
    blocks = []
    for b in range(n_blocks):
        block = build_direct_block(plan, b * per_block, per_block)[0]
        if config.stream:
            block.arrays = None
        blocks.append(block)
    counts = np.zeros((2, n_frames))
    for b in range(n_blocks):
        start, stop = b * per_block, min((b + 1) * per_block, n_frames)
        counts[:, start:stop] = frame_photon_counts(plan, start, stop)
    return DirectProblem(
        detector=detector, grid=grid, sampling=sampling, rotations=blocks[0].rotations, mesh=mesh,
        geometry=geometry_arrays, rotation_set=None, blocks=[], batch=None, n_frames=n_frames,
        n_padded=n_blocks * per_block, n_slots=n_slots, n_shells=int(background.shape[1]), lengths=(0, 0),
        photons=counts[0], expected_background=counts[1], frame_weights=weights,
        truth=dataset.read_truth() if dataset.has_truth else None, plan=None, stream=config.stream,
        kept_budget=1024, direct_plan=plan, direct_blocks=blocks,
    )


def _longest_frame(plan: DirectPlan, start: int, n_local: int) -> int:
    frames = plan.source.read(start, start + n_local)
    return int(max(np.diff(frames.photon_offsets).max(initial=0) + np.diff(frames.dead_offsets).max(initial=0), 0))


def signal_table(plan: DirectPlan, intensity):
    """What :func:`block_signal` needs of the model once per E-step: the cut table (tabulated), else None."""
    if plan.signal == "exact":
        return None
    return cut_signal.cut_table(intensity, plan.cut, plan.grid.tables)


def block_signal(plan: DirectPlan, intensity, quaternions: jax.Array, n_shells: int, table=None) -> jax.Array:
    """(n_rot, n_shells) expected signal of the block's rotations at phi = 1, in chunks of ``SIGNAL_CHUNK``:
    exact, or from the cut ``table`` of :func:`signal_table`."""
    proj, shape, n_box = plan.projection
    n_rot = quaternions.shape[0]
    pad = -n_rot % SIGNAL_CHUNK
    quats = jnp.concatenate([quaternions, jnp.tile(quaternions[:1], (pad, 1))])
    h_max = model_lib.bucket_count(int(np.max(np.asarray(model_lib.near_sphere_counts(quats, proj)))))
    parts = []
    for i in range(0, quats.shape[0], SIGNAL_CHUNK):
        chunk = quats[i : i + SIGNAL_CHUNK]
        if plan.signal == "exact":
            parts.append(kernels.exact_signal(intensity, chunk, proj, plan.geometry, shape, h_max, n_box, n_shells)[0])
        else:
            parts.append(cut_signal.tabulated_signal(table, chunk, proj, plan.cut, shape, h_max, n_shells)[0])
    return jnp.concatenate(parts)[:n_rot]


def direct_estep(problem: DirectProblem, intensity, phi, state: EMCState, spec: StepSpec, entries: bool = False):
    """E-step over every block: (kept pairs, kept rotations, (4, n_padded) stats).

    The kept pairs are a :class:`~emcjax.core.direct_mstep.DirectKept` with the kept rotations' sampling
    indices (touched entries only: emcjax.direct_kept.direct_kept), or with ``entries`` a table-path ``Kept``
    numbered into the kept rotations' in-peak entries with their ``RotationSet``. Seconds per phase
    accumulate in ``problem.seconds``.
    """
    plan = problem.direct_plan
    stats = np.zeros((4, problem.n_padded))
    pairs = []
    clock = _start(problem)
    table = signal_table(plan, intensity)
    clock = _lap(problem, "cut table", clock, table) if table is not None else clock
    for block in problem.data_blocks():
        if plan.signal == "exact":
            signal = block_signal(plan, intensity, block.arrays.quaternions, problem.n_shells)
            signal = kernels.candidate_signal(signal, block.arrays.local)
        else:
            local = block.arrays.local
            rot = crystal_from_lab(block.arrays.quaternions)[local.candidates]
            signal = cut_signal.near_frame_signal(table, rot, block.arrays.frame_reflections, local.masked_shells,
                                                  plan.projection[0], plan.cut, plan.projection[1], block.n_near)
        clock = _lap(problem, "signal", clock, signal)
        photon = _photon_terms(block, intensity, phi, state.likelihood, plan.geometry)
        result = kernels.estep_direct(intensity, phi, state.likelihood, state.hyper, plan.geometry, block.arrays,
                                      signal, spec.max_kept, photon)
        clock = _lap(problem, "photons and posterior", clock, result)
        values = [np.asarray(v) for v in result.stats]
        values[2] = block.rotations[values[2]]
        n = min(block.n_local, problem.n_padded - block.start)
        stats[:, block.start : block.start + n] = np.stack(values)[:, :n]
        prob = np.asarray(result.prob)
        frame, j = np.nonzero(prob > 0)
        slot = np.asarray(result.slot)[frame, j]
        cand = block.host("candidates")[frame, slot]
        quaternion = block.host("quaternions")[cand]
        n_pairs = 1 << max(frame.shape[0] - 1, 0).bit_length()  # few compiled shapes
        inside = np.asarray(packed_photons.pair_inside(plan.geometry, np.resize(quaternion, (n_pairs, 4)),
                                                       block.records["pixel"][np.resize(frame, n_pairs)]))
        pairs.append(BlockPairs(
            frame=block.start + frame, local_frame=frame, rotation=block.rotations[cand], prob=prob[frame, j],
            signal=np.asarray(signal)[frame, slot], quaternion=quaternion,
            inside=inside[: frame.shape[0]], records=block.records,
            masked=block.host("masked_shells")[frame], background=block.host("background")[frame]))
        clock = _lap(problem, "kept pairs", clock, None)
    with_background = not state.likelihood.linear_zero_term
    if entries:
        kept, union_set = kept_from_direct(problem, pairs, with_background)
        _lap(problem, "kept rotations' entries", clock, kept)
        return kept, union_set, stats
    kept, union = direct_kept(pairs, problem.detector.polarization, problem.n_shells, with_background)
    _lap(problem, "kept pairs", clock, None)
    return kept, union, stats


def _photon_terms(block: DirectBlockData, intensity, phi, likelihood, geometry) -> jax.Array:
    """(n_local, n_slots) photon terms of a block over its packed record rows (packed_photons), redone with
    room for more in-peak triples if a chunk had more than ``block.max_hits`` (the sizes are set at set-up by
    the same test; this only guards against float32 differences between compilations)."""
    arrays = block.arrays
    args = (intensity, local_phi(phi, arrays.local), likelihood, geometry, arrays.quaternions,
            arrays.local.candidates, arrays.local.frame_start, arrays.rows, arrays.row_frame)
    while True:
        photon, hits = packed_photons.photon_terms(*args, block.max_hits)
        if int(hits) <= block.max_hits:
            return photon
        block.max_hits = bucket_hits(int(hits))


def _lap(problem: DirectProblem, phase: str, clock: float, result) -> float:
    """Adds the wall seconds since ``clock`` to ``problem.seconds[phase]`` and the process CPU seconds since the
    last lap to ``problem.cpu_seconds[phase]`` (on a shared machine the CPU split is the one to read)."""
    jax.block_until_ready(result)
    now, cpu = time.perf_counter(), time.process_time()
    problem.seconds[phase] = problem.seconds.get(phase, 0.0) + now - clock
    last = problem.cpu_seconds.pop("_last", cpu)
    problem.cpu_seconds[phase] = problem.cpu_seconds.get(phase, 0.0) + cpu - last
    problem.cpu_seconds["_last"] = cpu
    return now


def _start(problem: DirectProblem) -> float:
    """The clock of a phase's first lap (and its CPU start)."""
    problem.cpu_seconds["_last"] = time.process_time()
    return time.perf_counter()


def _direct_msteps(spec: StepSpec, likelihood) -> bool:
    """Whether the M-steps run on the touched entries (emcjax.core.direct_mstep): the reference intensity
    update and the closed-form phi update of a Poisson likelihood; else the table path's on the kept rotations'
    in-peak entries."""
    return (spec.intensity_update == "reference" and getattr(likelihood, "poisson_counts", False)
            and not spec.refine_background and not spec.refine_background_shells)


def iteration(problem: DirectProblem, state: EMCState, spec: StepSpec):
    """One iteration (E-step, intensity update[, E-step, phi update]): (state, Diagnostics), like emc's
    host-driven iteration, with the table path's M-steps (on the touched entries where they allow it)."""
    phi = jnp.pad(state.phi, (0, problem.n_padded - problem.n_frames))
    if not _direct_msteps(spec, state.likelihood):
        return _table_iteration(problem, state, spec, phi)
    plan = problem.direct_plan
    proj, shape, n_box = plan.projection
    dk, union, first = direct_estep(problem, state.intensity, phi, state, spec)
    clock = _start(problem)
    quats = jnp.asarray(dk.quaternions)
    h_max = -(-int(np.max(np.asarray(model_lib.near_sphere_counts(quats, proj)))) // 64) * 64  # few compiled shapes
    rows = direct_mstep.exposure_rows(phi, dk, problem.n_shells)
    every = direct_mstep.exposure_projection(rows, quats, union.shape[0], proj, plan.geometry, shape, h_max, n_box,
                                             state.intensity.size + 1)
    intensity = direct_mstep.intensity_update(state.intensity, phi, state.likelihood, dk, plan.geometry, every,
                                              problem.n_shells)
    _lap(problem, "M-steps", clock, intensity)
    last = first
    if spec.update_phi:
        dk, union, last = direct_estep(problem, intensity, phi, state, spec)
        clock = _start(problem)
        intensity, phi = direct_mstep.phi_update(intensity, phi, state.likelihood, dk, plan.geometry, problem.n_shells)
        _lap(problem, "M-steps", clock, phi)
    new = state._replace(iteration=state.iteration + 1, intensity=intensity, phi=phi[: problem.n_frames])
    kept = dk.kept
    pairs = KeptRotations(kept.pair_frame, union[np.minimum(kept.pair_rotation, union.shape[0] - 1)], kept.pair_prob)
    return new, Diagnostics(first=FrameStats(*first), last=FrameStats(*last), n_live=0, kept=pairs)


def _table_iteration(problem: DirectProblem, state: EMCState, spec: StepSpec, phi):
    """:func:`iteration` with the table path's M-steps on the kept rotations' in-peak entries."""
    from emcjax.emc import mstep_kernel  # the M-step kernels of the table path, unchanged

    kept, kept_set, first = direct_estep(problem, state.intensity, phi, state, spec, entries=True)
    shared = kept_set.shared(problem.geometry)
    clock = _start(problem)
    intensity = mstep_kernel(problem.mesh, spec, "intensity")(state.intensity, phi, state.likelihood, kept, shared)
    _lap(problem, "M-steps", clock, intensity)
    last = first
    if spec.update_phi:
        kept, kept_set, last = direct_estep(problem, intensity, phi, state, spec, entries=True)
        shared = kept_set.shared(problem.geometry)
        clock = _start(problem)
        intensity, phi = mstep_kernel(problem.mesh, spec, "phi")(intensity, phi, state.likelihood, kept, shared)
        _lap(problem, "M-steps", clock, phi)
    new = state._replace(iteration=state.iteration + 1, intensity=intensity, phi=phi[: problem.n_frames])
    pairs = KeptRotations(*(parallel.host_array(x).ravel() for x in (kept.pair_frame, kept.pair_rotation, kept.pair_prob)))
    pairs = pairs._replace(rotation=kept_set.rotations[np.minimum(pairs.rotation, kept_set.rotations.shape[0] - 1)])
    return new, Diagnostics(first=FrameStats(*first), last=FrameStats(*last), n_live=0, kept=pairs)
