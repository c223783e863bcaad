"""The intensity update of a streamed iteration (emcjax.streaming) from its first pass's statistics: the kept
photon terms on disk grouped by entry (:class:`TermStore`), solved one entry group at a time (the per-entry
Newton solve of emcjax.core.mstep.reference_update, or the MLEM ratio sums)."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from emcjax import model as model_lib
from emcjax.core import mstep
from emcjax.core.step import StepSpec
from emcjax.core.stream import IntensitySums, PhotonTerms
from emcjax.data import bucket_length

NEWTON_STEPS = 30  # per-entry Newton steps of the intensity update (emcjax.core.mstep.reference_update's default)
TERM_DTYPE = np.dtype([("local", "<i4"), ("pk", "<f4"), ("b", "<f4")])


class TermStore:
    """The kept photon terms of a pass, on disk, in ``n_groups`` groups of entries (entry e in group
    e % n_groups, at position e // n_groups): one binary file per group, appended block by block."""

    def __init__(self, directory: pathlib.Path, n_groups: int):
        self.paths = [directory / f"group{g:05d}.bin" for g in range(n_groups)]
        self.n_groups = n_groups
        self.n_terms = np.zeros(n_groups, np.int64)

    def add(self, terms: PhotonTerms) -> None:
        entry, pk, b = (np.asarray(x).ravel() for x in terms)
        keep = pk > 0
        entry, pk, b = entry[keep], pk[keep], b[keep]
        group = entry % self.n_groups
        order = np.argsort(group, kind="stable")  # stable: each entry keeps its terms in frame order
        rows = np.empty(order.shape[0], TERM_DTYPE)
        rows["local"], rows["pk"], rows["b"] = entry[order] // self.n_groups, pk[order], b[order]
        bounds = np.searchsorted(group[order], np.arange(self.n_groups + 1))
        for g in np.flatnonzero(np.diff(bounds)):
            with open(self.paths[g], "ab") as f:
                f.write(rows[bounds[g] : bounds[g + 1]].tobytes())
        self.n_terms += np.diff(bounds)

    def read(self, group: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(local, pk, b) of a group, padded to the bucketed length of the largest group (one compiled shape;
        local = ``size`` on padding)."""
        rows = np.fromfile(self.paths[group], TERM_DTYPE) if self.n_terms[group] else np.empty(0, TERM_DTYPE)
        pad = bucket_length(max(int(self.n_terms.max()), 1)) - rows.shape[0]
        return (np.concatenate([rows["local"], np.full(pad, size, np.int32)]),
                np.concatenate([rows["pk"], np.zeros(pad, np.float32)]),
                np.concatenate([rows["b"], np.ones(pad, np.float32)]))


@functools.partial(jax.jit, static_argnames="size")
def _newton_group(local, pk, b, a, size: int):
    # a group's entries are few: Newton on them directly (segment = entry; emcjax.core.mstep._newton_entries
    # numbers the touched entries compactly first, a sort), the same steps and sums per entry
    live = (local < size) & (pk > 0)
    return mstep.newton_segments(local, pk, b, live, jnp.append(a, 0.0), size + 1, NEWTON_STEPS, a.dtype,
                                  until_fixed=True)[:size]


@functools.partial(jax.jit, static_argnames="size")
def _ratio_group(local, pk, b, w, size: int):
    """Per entry of a group: sum of P K / (B / phi + W) over its photon terms (the MLEM numerator)."""
    live = (local < size) & (pk > 0)
    ratio = jnp.where(live, pk / (b + jnp.append(w, 0.0)[local]), 0.0)
    return jax.ops.segment_sum(ratio, local, num_segments=size)


@jax.jit
def _exposure(sums: IntensitySums, shared):
    """(n_entries,) exposure of every entry from the per-device sums (emcjax.core.mstep.entry_exposure)."""
    total = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
    return mstep.exposure_of_rotations(total.per_rotation, total.per_rotation_shell, shared) - total.dead


@functools.partial(jax.jit, static_argnames="shape")
def _reference_voxels(w, exposure, shared, shape):
    numerator, denominator = mstep.back_project(jnp.stack([exposure * w, exposure]), shared, shape, None)
    return mstep.safe_divide(numerator, denominator).reshape(shape)


@functools.partial(jax.jit, static_argnames="shape")
def _mlem_step(flat, ratio, denominator, shared, shape):
    numerator = mstep.back_project(ratio[None], shared, shape, None)[0]
    return jnp.where(denominator > 0, flat * mstep.safe_divide(numerator, denominator), flat)


def _by_group(values: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_entries,) -> (size, n_groups): column g holds group g's entries (padded with 0)."""
    size = -(-values.shape[0] // n_groups)
    return np.pad(values, (0, size * n_groups - values.shape[0])).reshape(size, n_groups)


def solve_intensity(problem, spec: StepSpec, intensity, sums: IntensitySums, store: TermStore) -> jax.Array:
    """The intensity update from the first pass's statistics, one entry group at a time."""
    shared = problem.shared
    shape = tuple(intensity.shape)
    exposure = _exposure(sums, shared)
    n_entries = exposure.shape[0]
    groups = store.n_groups
    pol = np.asarray(shared.polarization)[np.asarray(shared.entries.pixel)]
    exposure_np = np.asarray(exposure)
    size = -(-n_entries // groups)
    if spec.intensity_update == "reference":
        a = _by_group(exposure_np * pol, groups)
        w = np.zeros((size, groups), np.float32)
        for g in range(groups):
            w[:, g] = np.asarray(_newton_group(*store.read(g, size), a[:, g], size=size))
        return _reference_voxels(jnp.asarray(w.ravel()[:n_entries]), exposure, shared, shape)
    denominator = mstep.back_project(jnp.asarray(exposure_np * pol)[None], shared, shape, None)[0]
    flat = intensity.reshape(-1)
    for _ in range(spec.inner_iterations):
        tomogram = _by_group(np.asarray(model_lib.tomogram(flat.reshape(shape), shared.entries)), groups)
        ratio = np.zeros((size, groups), np.float32)
        for g in range(groups):
            ratio[:, g] = np.asarray(_ratio_group(*store.read(g, size), tomogram[:, g], size=size))
        flat = _mlem_step(flat, jnp.asarray(ratio.ravel()[:n_entries]), denominator, shared, shape)
    return flat.reshape(shape)
