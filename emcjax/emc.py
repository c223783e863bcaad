"""The EMC iteration: E-step, intensity M-step and phi M-step on sparse frames.

Model (METHOD.md §5-7): the photon count of valid pixel t in frame d at orientation r is Poisson with mean

    lambda_drt = pol_t * (B_d(s_t) + phi_d * W_rt)

with B_d the frame's radial background per shell s_t, phi_d its scale and W_rt the model sliced at the
rotated pixel (emcjax.model). Up to per-frame constants the log-likelihood of a (frame, rotation) pair is

    L_dr = log w_r + sum_{photon/dead pixels t of d inside a peak at r} [K_dt log1p(phi_d W_rt / B_dt)
                                                                      + dead_dt phi_d pol_t W_rt]
                   - phi_d S_dr,        S_dr = sum_{valid t of d} pol_t W_rt,

so only photons that fall inside a peak at r matter (DESIGN.md "Computational notes"). The photon term is a
*sparse join*: every photon (and dead pixel) of every frame is joined once, at set-up, with the in-peak
entries of every candidate rotation at its pixel; an E-step is then a gather of the tomogram, a log1p and a
segment sum over the join, and S_dr comes from the per-rotation, per-shell expected signal.

Responsibilities are pruned like the reference (top mass ``prune_mass``, P >= ``prune_min``, at most
``max_kept``) and the M-steps touch only the join terms of kept (frame, rotation) pairs.

Intensity updates (``EMCConfig.intensity_update``):

* ``"mlem"``: the multiplicative EM update of the voxels given the responsibilities, with the
  latent split of each photon into Bragg and background,

      I_v <- I_v * [sum_{d,r} P_dr sum_t K_dt phi_d w_rtv / (B_dt + phi_d W_rt)]
                 / [sum_{d,r} P_dr sum_t phi_d pol_t w_rtv],

  repeated ``inner_iterations`` times (each raises the expected complete-data log-likelihood; the model
  stays non-negative). Measured on the 2000-frame benchmark set it over-fits voxels that only a few
  pixels touch with small trilinear weights (their ML value is a few photons over a tiny exposure), and
  the correlation with the truth falls after the first iteration; it is offered for research.
* ``"reference"`` (default): the reference program's per-pixel maximum likelihood followed by compression
  (METHOD.md §7.1): every in-peak entry (r, t) gets the 1-D Poisson ML value w_rt >= 0 given its frames, and
  each voxel becomes the trilinear-weighted average of those values.

Symmetry costs nothing: entries gather from, and M-steps scatter into, the asymmetric-unit model.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import gammaln

from emcjax import model as model_lib
from emcjax.crystal import Crystal
from emcjax.data import SparseDataset, SparseFrames, bucket_length
from emcjax.detector import Detector, DetectorGeometry, make_detector
from emcjax.errors import ConfigError, DataError
from emcjax.rotations import RotationSampling, grid_symmetry_orbits, sample_600cell

_BG_FLOOR = 1e-6  # photons per pixel: a background floor so log1p(phi W / B) stays finite
_EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class EMCConfig:
    """Settings of the EMC algorithm (what the reference program read from config.ini)."""

    rotation_n: int = 4
    """600-cell refinement parameter n of the orientation sampling (10(5n^3+n) rotations); used when the data
    set carries no candidate lists."""
    reduce_by_symmetry: bool = True
    """Evaluate one rotation per orbit of the point-group operations that map the grid onto itself (exact:
    the same posterior, up to |H| x faster; 4x for 422 on the 600-cell)."""
    vn: int = 10
    """Voxel grid points per shortest reciprocal-lattice vector."""
    gw: float = 2.0
    """Peak support radius, in grid spacings (min|a*|/vn)."""
    d_min: float | None = None
    """High-resolution limit in Å (default: the data set's detector limit)."""
    intensity_update: Literal["mlem", "reference"] = "reference"
    """Intensity M-step: the reference's per-pixel ML + compress (default, see docs/METHOD-NOTES.md) or
    multiplicative EM on voxels."""
    inner_iterations: int = 1
    """MLEM sub-iterations per intensity M-step (no new E-step between them)."""
    update_phi: bool = True
    """Alternate (E-step, intensity update) with (E-step, phi update); False keeps phi fixed."""
    prune_mass: float = 0.999
    """Keep the most likely rotations of a frame until this much probability mass is covered."""
    prune_min: float = 1e-4
    """Drop rotations with a probability below this."""
    max_kept: int = 32
    """At most this many rotations are kept per frame (top-k)."""

    def __post_init__(self):
        if self.rotation_n < 1:
            raise ConfigError(f"rotation_n must be >= 1, got {self.rotation_n}")
        if self.inner_iterations < 1:
            raise ConfigError(f"inner_iterations must be >= 1, got {self.inner_iterations}")
        if not 0 < self.prune_mass <= 1:
            raise ConfigError(f"prune_mass must be in (0, 1], got {self.prune_mass}")
        if not 0 <= self.prune_min < 1:
            raise ConfigError(f"prune_min must be in [0, 1), got {self.prune_min}")
        if self.max_kept < 1:
            raise ConfigError(f"max_kept must be >= 1, got {self.max_kept}")
        if self.intensity_update not in ("mlem", "reference"):
            raise ConfigError(f"intensity_update must be 'mlem' or 'reference', got {self.intensity_update!r}")


class EMCState(NamedTuple):
    """What an iteration changes (a pytree; what a checkpoint holds).

    Attributes:
      iteration: () int32, iterations done.
      intensity: (n_asu, n_voxels) float32 model (photons per unit pol per unit phi).
      phi: (n_frames,) float32 per-frame scale, mean 1, 0 marks a blank frame.
    """

    iteration: jax.Array
    intensity: jax.Array
    phi: jax.Array


class Join(NamedTuple):
    """(photon or dead pixel) x (in-peak entry of a candidate rotation) pairs, sorted by cell.

    A *cell* is a (frame, candidate slot) pair, flat index ``frame * n_slots + slot``.

    Attributes:
      cell: (n_join,) int32 cell of the pair.
      entry: (n_join,) int32 in-peak entry (its rotation is the cell's candidate).
      count: (n_join,) float32 photons K at the pixel (0 for a dead pixel).
      dead: (n_join,) float32 1 for a dead pixel, else 0.
      background: (n_join,) float32 B_d(s_t), photons per pixel per unit pol.
      polarization: (n_join,) float32 pol_t.
    """

    cell: jax.Array
    entry: jax.Array
    count: jax.Array
    dead: jax.Array
    background: jax.Array
    polarization: jax.Array


class Arrays(NamedTuple):
    """Device arrays of a problem (a pytree passed to the jitted kernels)."""

    entries: model_lib.Entries
    polarization: jax.Array  # (n_pix,) float32
    shell: jax.Array  # (n_pix,) int32
    candidates: jax.Array  # (n_frames, n_slots) int32 local rotation index
    candidate_mask: jax.Array  # (n_frames, n_slots) bool
    log_prior: jax.Array  # (n_rot,) float32 log weight of each local rotation
    masked_shells: jax.Array  # (n_frames, n_masked) int32 shells excluded per frame, n_shells = padding
    join: Join
    tables: model_lib.GridTables  # the grid's lookup tables (stabilizer symmetrisation)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """Everything fixed during a run: geometry, data, rotations and their joins.

    Attributes:
      detector: valid pixels (to ``d_min``).
      grid: the model grid.
      sampling: the orientation sampling the rotation indices refer to.
      rotations: (n_rot,) int64 global index (in ``sampling``) of each local rotation.
      arrays: device arrays.
      n_shells: radial shells of the background.
      cell_offsets: (n_frames * n_slots + 1,) int64 CSR offsets of the join by cell (host copy).
      log_offset: (n_frames,) float64 per-frame constant of the Poisson log-likelihood (nats).
      photons: (n_frames,) float64 photons per frame inside the valid pixels.
      expected_background: (n_frames,) float64 expected background photons per frame.
      truth: the data set's truth dict, or None.
    """

    detector: Detector
    grid: model_lib.ReciprocalGrid
    sampling: RotationSampling
    rotations: np.ndarray
    arrays: Arrays
    n_shells: int
    cell_offsets: np.ndarray
    log_offset: np.ndarray
    photons: np.ndarray
    expected_background: np.ndarray
    truth: dict | None

    @property
    def n_frames(self) -> int:
        return int(self.arrays.candidates.shape[0])

    @property
    def n_slots(self) -> int:
        return int(self.arrays.candidates.shape[1])

    def integrated(self, intensity) -> np.ndarray:
        """(n_asu,) integrated intensity of each unique reflection."""
        return model_lib.integrated_intensity(np.asarray(intensity))

    def cc_true(self, intensity) -> float | None:
        """Pearson correlation of integrated intensities with the truth (common unique hkl), or None."""
        if self.truth is None or "intensity" not in self.truth or "hkl" not in self.truth:
            return None
        return correlation_by_hkl(
            self.grid.asu.hkl, self.integrated(intensity), self.truth["hkl"], np.asarray(self.truth["intensity"]).sum(1)
        )


def correlation_by_hkl(hkl_a, values_a, hkl_b, values_b) -> float:
    """Pearson correlation of two per-reflection arrays over the Miller indices they share."""
    key_a = {tuple(h): i for i, h in enumerate(np.asarray(hkl_a).tolist())}
    pairs = [(key_a[tuple(h)], j) for j, h in enumerate(np.asarray(hkl_b).tolist()) if tuple(h) in key_a]
    if len(pairs) < 2:
        return float("nan")
    ia, ib = np.asarray(pairs).T
    return float(np.corrcoef(np.asarray(values_a)[ia], np.asarray(values_b)[ib])[0, 1])


# ---------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------


def _ragged_ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenation of ranges [starts[i], starts[i] + lengths[i]): (values, owner index i of each value)."""
    lengths = np.asarray(lengths, np.int64)
    owner = np.repeat(np.arange(lengths.shape[0]), lengths)
    first = np.cumsum(lengths) - lengths
    values = np.repeat(np.asarray(starts, np.int64), lengths) + np.arange(owner.shape[0]) - np.repeat(first, lengths)
    return values, owner


class PixelRecords(NamedTuple):
    """Photons and dead pixels of a block of frames inside the valid pixels and the frames' unmasked shells.

    Attributes:
      frame: (n,) int64 frame of the record.
      pixel: (n,) int64 valid-pixel index.
      count: (n,) float64 photons (0 for a dead pixel).
      dead: (n,) float64 1 for a dead pixel, else 0.
      background: (n,) float64 B_d(s_t) at the pixel (photons per pixel per unit pol, >= 0).
    """

    frame: np.ndarray
    pixel: np.ndarray
    count: np.ndarray
    dead: np.ndarray
    background: np.ndarray


def pixel_records(frames: SparseFrames, detector: Detector, background: np.ndarray) -> PixelRecords:
    """The photons (then the dead pixels) of ``frames`` that the likelihood sees.

    Args:
      frames: sparse frames (raw pixel ids).
      detector: valid pixels.
      background: (n_frames, n_shells) background with masked shells < 0.
    """
    pixel_map = detector.pixel_map()
    parts = []
    for offsets, pixels, counts, dead in (
        (frames.photon_offsets, frames.photon_pixels, frames.photon_counts, 0.0),
        (frames.dead_offsets, frames.dead_pixels, None, 1.0),
    ):
        frame = np.repeat(np.arange(frames.n_frames), np.diff(offsets))
        pix = pixel_map[pixels]
        cnt = np.zeros(pix.shape, np.float64) if counts is None else counts.astype(np.float64)
        keep = pix >= 0
        frame, pix, cnt = frame[keep], pix[keep], cnt[keep]
        bg = background[frame, detector.shell[pix]]
        keep = bg >= 0  # photons in shells excluded for this frame do not count
        parts.append((frame[keep], pix[keep], cnt[keep], np.full(keep.sum(), dead), bg[keep]))
    return PixelRecords(*(np.concatenate(x) for x in zip(*parts)))


def build_join(
    frames: SparseFrames,
    detector: Detector,
    entries: model_lib.Entries,
    candidates: np.ndarray,
    candidate_mask: np.ndarray,
    background: np.ndarray,
) -> tuple[Join, np.ndarray]:
    """Joins every photon and dead pixel with the in-peak entries of its frame's candidate rotations.

    Args:
      frames: sparse frames (raw pixel ids).
      detector: valid pixels.
      entries: in-peak entries of the local rotations.
      candidates: (n_frames, n_slots) local rotation index of each slot.
      candidate_mask: (n_frames, n_slots) which slots are real.
      background: (n_frames, n_shells) float64 background with masked shells < 0.

    Returns:
      ``(join, cell_offsets)`` with the join sorted by cell and its CSR offsets.
    """
    n_frames, n_slots = candidates.shape
    rec_frame, rec_pixel, rec_count, rec_dead, rec_bg = pixel_records(frames, detector, background)

    ent_pixel = np.asarray(entries.pixel)
    ent_rot = np.asarray(entries.rotation)
    order = np.argsort(ent_pixel, kind="stable")
    pix_start = np.searchsorted(ent_pixel[order], np.arange(detector.n_pix + 1))
    pos, owner = _ragged_ranges(pix_start[rec_pixel], pix_start[rec_pixel + 1] - pix_start[rec_pixel])
    entry = order[pos]
    frame = rec_frame[owner]

    # Slot of (frame, rotation): position of the rotation in the frame's sorted candidate list.
    n_rot = entries.n_rot
    cand_key = np.where(candidate_mask, np.arange(n_frames)[:, None] * n_rot + candidates, -1)
    slot_order = np.argsort(cand_key, axis=1, kind="stable")
    sorted_keys = np.take_along_axis(cand_key, slot_order, axis=1).ravel()
    key = frame * n_rot + ent_rot[entry]
    at = np.searchsorted(sorted_keys, key)
    at_c = np.minimum(at, sorted_keys.shape[0] - 1)
    hit = sorted_keys[at_c] == key
    cell = frame[hit] * n_slots + slot_order.ravel()[at_c[hit]]
    entry, owner = entry[hit], owner[hit]
    order = np.argsort(cell, kind="stable")
    cell, entry, owner = cell[order], entry[order], owner[order]
    cell_offsets = np.searchsorted(cell, np.arange(n_frames * n_slots + 1)).astype(np.int64)
    join = Join(
        cell=jnp.asarray(cell, jnp.int32),
        entry=jnp.asarray(entry, jnp.int32),
        count=jnp.asarray(rec_count[owner], jnp.float32),
        dead=jnp.asarray(rec_dead[owner], jnp.float32),
        background=jnp.asarray(np.maximum(rec_bg[owner], _BG_FLOOR), jnp.float32),
        polarization=jnp.asarray(detector.polarization[rec_pixel[owner]], jnp.float32),
    )
    return join, cell_offsets


def _frame_constants(frames: SparseFrames, detector: Detector, background: np.ndarray):
    """Per-frame photons, expected background and log-likelihood constant (all float64)."""
    n_frames, n_shells = background.shape
    pol_per_shell = np.bincount(detector.shell, weights=detector.polarization, minlength=n_shells)
    bg = np.where(background >= 0, np.maximum(background, _BG_FLOOR), 0.0)
    rec = pixel_records(frames, detector, background)
    rec_bg = np.maximum(rec.background, _BG_FLOOR)
    pol = detector.polarization[rec.pixel]
    photons = np.bincount(rec.frame, weights=rec.count, minlength=n_frames)
    expected = bg @ pol_per_shell - np.bincount(rec.frame, weights=rec.dead * pol * rec_bg, minlength=n_frames)
    term = rec.count * np.log(pol * rec_bg) - gammaln(rec.count + 1)
    log_offset = np.bincount(rec.frame, weights=term, minlength=n_frames) - expected
    return photons, expected, log_offset


def _sampling(crystal: Crystal, n: int, reduce: bool) -> tuple[RotationSampling, np.ndarray, np.ndarray]:
    """The 600-cell grid, the rotations the E-step evaluates and their log prior (normalised).

    With ``reduce`` the grid is reduced exactly by the point-group operations it shares
    (:func:`emcjax.rotations.grid_symmetry_orbits`); a representative carries its orbit's total weight.
    """
    sampling = sample_600cell(n)
    if not reduce:
        return sampling, np.arange(sampling.n_rot, dtype=np.int64), sampling.log_weights
    representative, orbit = grid_symmetry_orbits(sampling, crystal.rotation_ops_cartesian)
    weight = np.bincount(orbit, weights=np.exp(sampling.log_weights - sampling.log_weights.max()))
    return sampling, representative, np.log(weight)


def setup_problem(dataset: SparseDataset, config: EMCConfig, frames: SparseFrames | None = None) -> Problem:
    """One-time set-up: detector, grid, rotations, in-peak entries and the sparse join.

    Args:
      dataset: the data set (geometry, crystal and, unless ``frames`` is given, all frames are read).
      config: algorithm settings.
      frames: frames to use instead of reading all of ``dataset``.

    Raises:
      ConfigError: settings that contradict the data (e.g. ``d_min`` beyond the detector).
      DataError: no frame, or no usable pixel.
    """
    geometry = DetectorGeometry(**dataset.geometry)
    crystal_attrs = {k: v for k, v in dataset.crystal.items() if k in ("cell", "space_group")}
    crystal = Crystal(cell=tuple(crystal_attrs["cell"]), space_group=str(crystal_attrs["space_group"]))
    detector = make_detector(geometry, dataset.mask)
    d_min = geometry.resolution_max_A if config.d_min is None else config.d_min
    if d_min < geometry.resolution_max_A:
        raise ConfigError(
            f"d_min={d_min} Å is beyond the data set's pixels (resolution_max_A={geometry.resolution_max_A} Å)"
        )
    detector = detector.truncate(d_min)
    frames = dataset.read_all() if frames is None else frames
    if frames.n_frames == 0:
        raise DataError(f"{dataset.path}: the data set holds no frame")
    q_min = float(np.linalg.norm(detector.q, axis=1).min())
    grid = model_lib.make_grid(crystal, d_min=d_min, d_max=1.0 / max(q_min, 1e-9), vn=config.vn, gw=config.gw)

    if frames.candidate_offsets is not None:
        sampling, _, log_w = _sampling(crystal, int(dataset.candidate_sampling_n), reduce=False)
        rotations, inverse = np.unique(frames.candidate_rotations, return_inverse=True)
        counts = np.diff(frames.candidate_offsets)
        n_slots = max(int(counts.max()), 1)
        candidates = np.zeros((frames.n_frames, n_slots), np.int64)
        candidate_mask = np.arange(n_slots)[None, :] < counts[:, None]
        candidates[candidate_mask] = inverse
        log_w = log_w[rotations]
    else:
        sampling, rotations, log_w = _sampling(crystal, config.rotation_n, config.reduce_by_symmetry)
        candidates = np.broadcast_to(np.arange(rotations.shape[0]), (frames.n_frames, rotations.shape[0]))
        candidate_mask = np.ones(candidates.shape, bool)

    quats = sampling.quaternions[rotations]
    entries = model_lib.build_entries(grid, detector.q, quats)
    log_w = log_w - np.logaddexp.reduce(log_w)

    background = np.asarray(frames.background, np.float64)
    masked = [np.flatnonzero(row < 0) for row in background]
    n_masked = max((m.shape[0] for m in masked), default=0)
    masked_shells = np.full((frames.n_frames, n_masked), background.shape[1], np.int32)
    for d, m in enumerate(masked):
        masked_shells[d, : m.shape[0]] = m
    join, cell_offsets = build_join(frames, detector, entries, candidates, candidate_mask, background)
    photons, expected_bg, log_offset = _frame_constants(frames, detector, background)
    arrays = Arrays(
        entries=entries,
        polarization=jnp.asarray(detector.polarization, jnp.float32),
        shell=jnp.asarray(detector.shell, jnp.int32),
        candidates=jnp.asarray(candidates, jnp.int32),
        candidate_mask=jnp.asarray(candidate_mask),
        log_prior=jnp.asarray(log_w, jnp.float32),
        masked_shells=jnp.asarray(masked_shells),
        join=join,
        tables=grid.tables,
    )
    truth = dataset.read_truth() if dataset.has_truth else None
    return Problem(
        detector=detector,
        grid=grid,
        sampling=sampling,
        rotations=rotations,
        arrays=arrays,
        n_shells=int(background.shape[1]),
        cell_offsets=cell_offsets,
        log_offset=log_offset,
        photons=photons,
        expected_background=expected_bg,
        truth=truth,
    )


def initial_state(problem: Problem, config: EMCConfig, seed: int) -> EMCState:
    """Random symmetric model (U(0,1) x exp(-r^2/gw^2) per voxel, the reference's start) and phi from counts.

    The model is scaled so that a frame at phi = 1 expects the mean number of non-background photons, and
    phi_d is proportional to the frame's photons above its expected background (mean 1).
    """
    rng = np.random.default_rng(seed)
    grid = problem.grid
    spacing = np.linalg.norm(grid.crystal.reciprocal_basis, axis=0).min() / config.vn
    r2 = np.einsum("ij,ij->i", grid.voxel_q(), grid.voxel_q()) / spacing**2
    intensity = rng.uniform(size=grid.model_shape) * np.exp(-r2 / config.gw**2)[None, :]
    intensity = np.asarray(model_lib.symmetrize(jnp.asarray(intensity, jnp.float32), grid.tables), np.float64)
    signal = problem.photons - problem.expected_background
    target = max(float(signal.mean()), 1e-3)
    s = np.asarray(
        model_lib.expected_signal(
            jnp.asarray(intensity, jnp.float32),
            problem.arrays.entries,
            problem.arrays.polarization,
            problem.arrays.shell,
            1,
        )
    )
    intensity *= target / max(float(s.mean()), _EPS)
    phi = np.maximum(signal, 0.1 * target) / target
    phi /= phi.mean()
    return EMCState(
        iteration=jnp.asarray(0, jnp.int32),
        intensity=jnp.asarray(intensity, jnp.float32),
        phi=jnp.asarray(phi, jnp.float32),
    )


# ---------------------------------------------------------------------------------------------------------
# E-step
# ---------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="n_shells")
def cell_signal(intensity: jax.Array, arrays: Arrays, n_shells: int) -> jax.Array:
    """(n_frames, n_slots) expected Bragg photons S_dr at phi = 1 over the frame's valid shells."""
    s = model_lib.expected_signal(intensity, arrays.entries, arrays.polarization, arrays.shell, n_shells)
    s_pad = jnp.concatenate([s, jnp.zeros((s.shape[0], 1), s.dtype)], axis=1)
    total = s.sum(axis=1)[arrays.candidates]
    masked = s_pad[arrays.candidates[:, :, None], arrays.masked_shells[:, None, :]].sum(axis=-1)
    return total - masked


@functools.partial(jax.jit, static_argnames="n_shells")
def log_likelihood(intensity: jax.Array, phi: jax.Array, arrays: Arrays, n_shells: int) -> jax.Array:
    """Log-posterior (unnormalised) of every (frame, candidate slot), up to per-frame constants.

    Args:
      intensity: (n_asu, n_voxels) model.
      phi: (n_frames,) scales.
      arrays: problem arrays.
      n_shells: number of background shells.

    Returns:
      (n_frames, n_slots) float32 L_dr (nats), -inf on padding slots.
    """
    n_frames, n_slots = arrays.candidates.shape
    join = arrays.join
    w = model_lib.tomogram(intensity, arrays.entries)[join.entry]
    phi_j = phi[join.cell // n_slots]
    bragg = phi_j * w
    terms = join.count * jnp.log1p(bragg / join.background) + join.dead * join.polarization * bragg
    photon_term = jax.ops.segment_sum(terms, join.cell, num_segments=n_frames * n_slots, indices_are_sorted=True)
    s = cell_signal(intensity, arrays, n_shells)
    logl = photon_term.reshape(n_frames, n_slots) - phi[:, None] * s + arrays.log_prior[arrays.candidates]
    return jnp.where(arrays.candidate_mask, logl, -jnp.inf)


class Responsibilities(NamedTuple):
    """Pruned posterior over rotations, padded (n_frames, k).

    Attributes:
      slot: (n_frames, k) int32 candidate slot, most likely first.
      prob: (n_frames, k) float32 renormalised probability (0 where pruned).
      log_evidence: (n_frames,) float32 log sum_r exp(L_dr) before pruning (nats, up to the frame constant).
      max_prob: (n_frames,) float32 probability of the most likely rotation before pruning.
    """

    slot: jax.Array
    prob: jax.Array
    log_evidence: jax.Array
    max_prob: jax.Array


@functools.partial(jax.jit, static_argnames=("k", "prune_mass", "prune_min"))
def responsibilities(logl: jax.Array, k: int, prune_mass: float, prune_min: float) -> Responsibilities:
    """Softmax over candidates, then the reference's pruning (METHOD.md §6.5) capped at the top ``k``.

    Keeps the most likely rotations until their cumulative probability reaches ``prune_mass``, drops those
    below ``prune_min`` (the most likely one is always kept), renormalises.
    """
    k = min(k, logl.shape[1])
    top, slot = jax.lax.top_k(logl, k)
    log_evidence = jax.nn.logsumexp(logl, axis=1)
    finite = jnp.isfinite(log_evidence)
    p = jnp.where(finite[:, None], jnp.exp(top - jnp.where(finite, log_evidence, 0.0)[:, None]), 0.0)
    before = jnp.cumsum(p, axis=1) - p
    keep = (before < prune_mass) & (p >= prune_min)
    keep = keep.at[:, 0].set(finite)
    p = jnp.where(keep, p, 0.0)
    p = p / jnp.maximum(p.sum(axis=1, keepdims=True), _EPS)
    max_prob = jnp.where(finite, jnp.exp(top[:, 0] - jnp.where(finite, log_evidence, 0.0)), 0.0)
    return Responsibilities(slot=slot.astype(jnp.int32), prob=p, log_evidence=log_evidence, max_prob=max_prob)


# ---------------------------------------------------------------------------------------------------------
# Kept pairs: the part of the join the M-steps need
# ---------------------------------------------------------------------------------------------------------


class Kept(NamedTuple):
    """The join terms of kept (frame, rotation) pairs, padded to a bucketed length.

    Attributes:
      join_index: (n,) int32 index into the join (0 on padding).
      prob: (n,) float32 P_dr of the pair (0 on padding).
      frame: (n,) int32 frame of the pair.
      pair_frame / pair_rotation / pair_prob: (n_frames * k,) every kept pair (prob 0 where pruned).
    """

    join_index: jax.Array
    prob: jax.Array
    frame: jax.Array
    pair_frame: jax.Array
    pair_rotation: jax.Array
    pair_prob: jax.Array


def kept_pairs(problem: Problem, resp: Responsibilities) -> Kept:
    """Selects the join terms of the kept pairs (host-side index work, device gathers)."""
    n_slots = problem.n_slots
    slot = np.asarray(resp.slot)
    prob = np.asarray(resp.prob)
    n_frames, k = slot.shape
    frame = np.repeat(np.arange(n_frames), k)
    cell = frame * n_slots + slot.ravel()
    p = prob.ravel()
    live = p > 0
    starts = problem.cell_offsets[cell[live]]
    lengths = problem.cell_offsets[cell[live] + 1] - starts
    index, owner = _ragged_ranges(starts, lengths)
    n = bucket_length(max(index.shape[0], 1))
    pad = n - index.shape[0]
    rotation = np.asarray(problem.arrays.candidates)[frame, slot.ravel()]
    return Kept(
        join_index=jnp.asarray(np.pad(index, (0, pad)), jnp.int32),
        prob=jnp.asarray(np.pad(p[live][owner], (0, pad)), jnp.float32),
        frame=jnp.asarray(np.pad(frame[live][owner], (0, pad)), jnp.int32),
        pair_frame=jnp.asarray(frame, jnp.int32),
        pair_rotation=jnp.asarray(rotation, jnp.int32),
        pair_prob=jnp.asarray(p, jnp.float32),
    )


def _entry_weight(phi: jax.Array, kept: Kept, arrays: Arrays, n_shells: int) -> jax.Array:
    """(n_entries,) sum over kept pairs (d, r) with r the entry's rotation of P_dr phi_d, over the frame's valid
    shells at the entry's pixel, minus kept dead pixels: the 'exposure' c_rt of each entry."""
    n_rot = arrays.entries.n_rot
    pw = kept.pair_prob * phi[kept.pair_frame]
    per_rot = jax.ops.segment_sum(pw, kept.pair_rotation, num_segments=n_rot)
    masked = arrays.masked_shells[kept.pair_frame]  # (pairs, n_masked)
    seg = kept.pair_rotation[:, None] * (n_shells + 1) + masked
    per_rot_shell = jax.ops.segment_sum(
        jnp.broadcast_to(pw[:, None], masked.shape).ravel(), seg.ravel(), num_segments=n_rot * (n_shells + 1)
    ).reshape(n_rot, n_shells + 1)
    ent = arrays.entries
    exposure = per_rot[ent.rotation] - per_rot_shell[ent.rotation, arrays.shell[ent.pixel]]
    join = arrays.join
    dead = kept.prob * phi[kept.frame] * join.dead[kept.join_index]
    return exposure - jax.ops.segment_sum(dead, join.entry[kept.join_index], num_segments=exposure.shape[0])


# ---------------------------------------------------------------------------------------------------------
# M-steps
# ---------------------------------------------------------------------------------------------------------


def _scatter_voxels(values: jax.Array, entries: model_lib.Entries, index: jax.Array | None, size: int) -> jax.Array:
    """Back-projects per-entry values through the trilinear weights into the padded flat model."""
    voxels = entries.voxels if index is None else entries.voxels[index]
    weights = entries.weights if index is None else entries.weights[index]
    return jax.ops.segment_sum((values[:, None] * weights).ravel(), voxels.ravel(), num_segments=size)


@functools.partial(jax.jit, static_argnames=("n_shells", "inner_iterations"))
def mlem_update(intensity, phi, kept: Kept, arrays: Arrays, n_shells: int, inner_iterations: int):
    """Multiplicative EM update of the voxels (module docstring), ``inner_iterations`` times."""
    size = intensity.size + 1
    ent = arrays.entries
    tables = arrays.tables
    pol = arrays.polarization[ent.pixel]
    denominator = _scatter_voxels(_entry_weight(phi, kept, arrays, n_shells) * pol, ent, None, size)[:-1]
    denominator = model_lib.stabilizer_sum(denominator.reshape(intensity.shape), tables).reshape(-1)
    join = arrays.join
    entry = join.entry[kept.join_index]
    phi_k = phi[kept.frame]
    pk = kept.prob * join.count[kept.join_index] * phi_k
    bg = join.background[kept.join_index]

    def body(_, flat_intensity):
        current = flat_intensity.reshape(intensity.shape)
        w = model_lib.tomogram(current, ent)[entry]
        ratio = pk / (bg + phi_k * w)
        numerator = _scatter_voxels(ratio, ent, entry, size)[:-1]
        numerator = model_lib.stabilizer_sum(numerator.reshape(intensity.shape), tables).reshape(-1)
        updated = flat_intensity * numerator / jnp.maximum(denominator, _EPS)
        return jnp.where(denominator > _EPS, updated, flat_intensity)

    return jax.lax.fori_loop(0, inner_iterations, body, intensity.reshape(-1)).reshape(intensity.shape)


@functools.partial(jax.jit, static_argnames=("n_shells", "newton_steps"))
def reference_update(intensity, phi, kept: Kept, arrays: Arrays, n_shells: int, newton_steps: int = 30):
    """The reference's per-pixel ML + compress (METHOD.md §7.1), with w_rt >= 0.

    For each in-peak entry e = (r, t): w_e solves sum_{kept d} P_dr phi_d pol_t = sum P_dr K_dt / (B_dt/phi_d + w),
    found by Newton's method from w = 0 (monotone for this convex decreasing function), w = 0 when the
    right side at 0 is already smaller. Then I_v = sum_e c_e w_ev w_e / sum_e c_e w_ev with c_e = sum P_dr phi_d;
    voxels no kept pair observes are set to 0 (as the reference does).
    """
    ent = arrays.entries
    tables = arrays.tables
    n_entries = ent.rotation.shape[0]
    exposure = _entry_weight(phi, kept, arrays, n_shells)
    a = exposure * arrays.polarization[ent.pixel]
    join = arrays.join
    entry = join.entry[kept.join_index]
    phi_k = phi[kept.frame]
    pk = kept.prob * join.count[kept.join_index]
    b = join.background[kept.join_index] / jnp.maximum(phi_k, _EPS)
    live = (pk > 0) & (phi_k > 0)

    def g_and_slope(w):
        x = jnp.where(live, pk / (b + w[entry]), 0.0)
        g = jax.ops.segment_sum(x, entry, num_segments=n_entries) - a
        slope = -jax.ops.segment_sum(jnp.where(live, x * x / jnp.maximum(pk, _EPS), 0.0), entry, num_segments=n_entries)
        return g, slope

    def body(_, w):
        g, slope = g_and_slope(w)
        step = jnp.where(slope < 0, -g / jnp.minimum(slope, -_EPS), 0.0)
        return jnp.where(g > 0, w + step, w)

    w0 = jnp.zeros(n_entries, jnp.float32)
    g0, _ = g_and_slope(w0)
    w = jax.lax.fori_loop(0, newton_steps, body, w0)
    w = jnp.where(g0 > 0, w, 0.0)
    size = intensity.size + 1
    numerator = _scatter_voxels(exposure * w, ent, None, size)[:-1].reshape(intensity.shape)
    denominator = _scatter_voxels(exposure, ent, None, size)[:-1].reshape(intensity.shape)
    numerator = model_lib.stabilizer_sum(numerator, tables).reshape(-1)
    denominator = model_lib.stabilizer_sum(denominator, tables).reshape(-1)
    flat = intensity.reshape(-1)
    updated = jnp.where(denominator > _EPS, numerator / jnp.maximum(denominator, _EPS), 0.0)
    return updated.reshape(intensity.shape)


@functools.partial(jax.jit, static_argnames=("n_shells", "newton_steps"))
def phi_update(intensity, phi, resp: Responsibilities, kept: Kept, arrays: Arrays, n_shells: int, newton_steps: int = 40):
    """Per-frame 1-D Poisson ML of phi >= 0 given the responsibilities (METHOD.md §7.3).

    Maximises sum_{kept r} P_dr [sum_t K_dt log(B_dt + phi W_rt) - phi S_dr] by Newton's method from phi = 0
    (the gradient is convex and decreasing in phi); phi = 0 when the gradient at 0 is <= 0 (a blank frame).
    Returns the new (unnormalised) phi.
    """
    n_frames = phi.shape[0]
    s = cell_signal(intensity, arrays, n_shells)
    expected = jnp.sum(resp.prob * jnp.take_along_axis(s, resp.slot, axis=1), axis=1)
    join = arrays.join
    w = model_lib.tomogram(intensity, arrays.entries)[join.entry[kept.join_index]]
    dead = kept.prob * join.dead[kept.join_index] * join.polarization[kept.join_index] * w
    expected = expected - jax.ops.segment_sum(dead, kept.frame, num_segments=n_frames)
    pk = kept.prob * join.count[kept.join_index]
    bg = join.background[kept.join_index]

    def grad(p):
        x = pk * w / (bg + p[kept.frame] * w)
        g = jax.ops.segment_sum(x, kept.frame, num_segments=n_frames) - expected
        slope = -jax.ops.segment_sum(x * x / jnp.maximum(pk, _EPS), kept.frame, num_segments=n_frames)
        return g, slope

    def body(_, p):
        g, slope = grad(p)
        return jnp.where(g > 0, p - g / jnp.minimum(slope, -_EPS), p)

    p0 = jnp.zeros(n_frames, jnp.float32)
    g0, _ = grad(p0)
    p = jax.lax.fori_loop(0, newton_steps, body, p0)
    return jnp.where(g0 > 0, p, 0.0)


# ---------------------------------------------------------------------------------------------------------
# One iteration
# ---------------------------------------------------------------------------------------------------------


def estep(problem: Problem, state: EMCState, config: EMCConfig) -> Responsibilities:
    """E-step: pruned responsibilities of the current model and phi."""
    logl = log_likelihood(state.intensity, state.phi, problem.arrays, problem.n_shells)
    return responsibilities(logl, config.max_kept, config.prune_mass, config.prune_min)


def total_log_likelihood(problem: Problem, resp: Responsibilities) -> float:
    """Marginal Poisson log-likelihood of all frames (nats): sum_d [log sum_r w_r p(K_d | r) ]."""
    ev = np.asarray(resp.log_evidence, np.float64)
    ok = np.isfinite(ev)
    return float(np.sum(ev[ok] + problem.log_offset[ok]))


def update_intensity(problem: Problem, state: EMCState, resp: Responsibilities, config: EMCConfig) -> jax.Array:
    """Intensity M-step with the configured rule."""
    kept = kept_pairs(problem, resp)
    if config.intensity_update == "reference":
        return reference_update(state.intensity, state.phi, kept, problem.arrays, problem.n_shells)
    return mlem_update(state.intensity, state.phi, kept, problem.arrays, problem.n_shells, config.inner_iterations)


def update_phi(problem: Problem, state: EMCState, resp: Responsibilities) -> tuple[jax.Array, jax.Array]:
    """phi M-step followed by the mean-1 normalisation with the inverse factor on the model."""
    kept = kept_pairs(problem, resp)
    phi = phi_update(state.intensity, state.phi, resp, kept, problem.arrays, problem.n_shells)
    mean = jnp.maximum(jnp.mean(phi), _EPS)
    return state.intensity * mean, phi / mean


def iterate(problem: Problem, state: EMCState, config: EMCConfig) -> tuple[EMCState, dict, dict]:
    """One EMC iteration: E-step + intensity update, then (if ``update_phi``) E-step + phi update.

    Returns:
      ``(state, metrics, per_frame)``: the new state; python floats ``log_likelihood`` (of the first E-step,
      nats), ``model_change`` (relative L2), ``phi_mean``, ``phi_std``, ``phi_zero_fraction``, ``certainty``
      (mean most-likely probability), ``kept_mean`` (rotations kept per frame), ``cc_true`` (when the data
      have truth), ``seconds``; and per-frame numpy arrays ``best_rotation`` (index into the sampling) and
      ``best_probability``.
    """
    start = time.perf_counter()
    resp = estep(problem, state, config)
    logl = total_log_likelihood(problem, resp)
    intensity = update_intensity(problem, state, resp, config)
    phi = state.phi
    if config.update_phi:
        mid = state._replace(intensity=intensity)
        resp = estep(problem, mid, config)
        intensity, phi = update_phi(problem, mid, resp)
    new = EMCState(iteration=state.iteration + 1, intensity=intensity, phi=phi)
    old = np.asarray(state.intensity, np.float64)
    new_i = np.asarray(intensity, np.float64)
    phi_np = np.asarray(phi, np.float64)
    prob = np.asarray(resp.prob)
    slot = np.asarray(resp.slot)
    best_local = np.asarray(problem.arrays.candidates)[np.arange(problem.n_frames), slot[:, 0]]
    metrics = {
        "log_likelihood": logl,
        "model_change": float(np.linalg.norm(new_i - old) / max(np.linalg.norm(old), _EPS)),
        "phi_mean": float(phi_np.mean()),
        "phi_std": float(phi_np.std()),
        "phi_zero_fraction": float(np.mean(phi_np <= 1e-10)),
        "certainty": float(np.mean(np.asarray(resp.max_prob))),
        "kept_mean": float(np.mean(np.sum(prob > 0, axis=1))),
    }
    cc = problem.cc_true(intensity)
    if cc is not None:
        metrics["cc_true"] = cc
    metrics["seconds"] = time.perf_counter() - start
    per_frame = {
        "best_rotation": problem.rotations[best_local].astype(np.int64),
        "best_probability": np.asarray(resp.max_prob, np.float32),
    }
    return new, metrics, per_frame
