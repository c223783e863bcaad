"""Candidate orientations from spots (METHOD.md §10.1): ``python -m emcjax.orient``.

For every frame, the rotations of the 600-cell sampling (parameter n) under which at least ``min_spots``
distinct reflections lie within ``tolerance`` of the frame's spot centroids: for rotation R (quaternion
q) and lab-frame centroid x, the crystal-frame vector is y = crystal_from_lab(q) x, its fractional
indices h = B^-1 y, and the spot matches when |B (h - round(h))| <= tolerance (1/Å; default
gw / vn x min|a*|, the model's peak radius, as the reference). Spots closer than 2 x tolerance to each
other are merged first (the same reflection split into two patches), so with tolerance < min|a*| / 4
every matched spot is a distinct reflection and the count needs no pairwise hkl comparison.

The score is computed in JAX, vectorised over (frames x rotations x spots), in chunks of rotations
(the quaternions of the whole sampling stay on the device), chunks spread round-robin over the devices.
Only one rotation per orbit of the point-group operations that map the grid onto itself is scored
(emcjax.frontend.grid_orbits): a rotation and its symmetry mates match the same spots, so the orbit's
other members get the representative's count and the lists equal the full search's.
Deviation from the reference: a frame with more than ``max_spots`` spots uses its brightest ``max_spots``
instead of being discarded (docs/METHOD-NOTES.md).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from emcjax import toml_config
from emcjax.crystal import Crystal
from emcjax.data import SparseDataset, SparseFrames, bucket_length
from emcjax.errors import ConfigError, DataError, EmcjaxError
from emcjax.frontend.grid_orbits import grid_orbits
from emcjax.frontend.writer import SparseWriter
from emcjax.rotations import quaternion_to_matrix
from emcjax.sampling_600cell import sample_600cell


@dataclasses.dataclass(frozen=True)
class OrientConfig:
    """Candidate orientations of the frames of a reduced data set (with /spots, from emcjax.reduce)."""

    data: pathlib.Path = pathlib.Path("reduced.h5")
    """Input sparse data set with /spots."""
    out: pathlib.Path = pathlib.Path("oriented.h5")
    """Output: the same data set with candidate lists (docs/FORMATS.md)."""
    sampling_n: int = 70
    """600-cell refinement parameter n of the rotations tested (10(5n^3+n) rotations)."""
    vn: int = 15
    """Voxel grid points per min|a*| (sets the default tolerance gw/vn x min|a*|)."""
    gw: float = 2.0
    """Peak radius in grid spacings (sets the default tolerance)."""
    tolerance: float | None = None
    """Match radius around reciprocal-lattice points in 1/Å (default gw/vn x min|a*|)."""
    d_min: float | None = None
    """Spots beyond this resolution (Å) are ignored (default: the data set's resolution_max_A)."""
    min_spots: int = 3
    """Distinct reflections a rotation must match to be a candidate (and spots a frame needs)."""
    max_spots: int = 20
    """At most this many spots (the brightest) are used per frame."""
    max_candidates: int = 0
    """Keep at most this many candidates per frame, the best-matching first (0: all)."""
    keep_empty: bool = False
    """Keep frames without candidates (with an empty list) instead of dropping them as the reference does."""
    chunk_rotations: int = 8192
    """Rotations scored at once per device (CPU: ~8192 x frame_batch 8 keeps the work in cache; a GPU
    prefers larger, e.g. 65536)."""
    orbits: bool = True
    """Score one rotation per orbit of the grid-preserving point-group operations (exact; 4x for 422)."""
    frame_batch: int = 8
    """Frames scored together (they share each chunk's rotation matrices)."""
    block_frames: int = 1024
    """Frames per committed block of the output."""
    resume: bool = False
    """Continue an interrupted run of the same settings."""
    overwrite: bool = False
    """Replace an existing output file."""
    config: pathlib.Path | None = None
    """TOML file whose values become the defaults of all other fields (flags override)."""

    def __post_init__(self) -> None:
        for name in ("sampling_n", "vn", "min_spots", "chunk_rotations", "frame_batch", "block_frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_spots < self.min_spots:
            raise ConfigError(f"max_spots = {self.max_spots} must be >= min_spots = {self.min_spots}")


def default_tolerance(crystal: Crystal, vn: int, gw: float) -> float:
    """gw / vn x min|a*| in 1/Å (the model's peak radius)."""
    return gw / vn * float(np.linalg.norm(crystal.reciprocal_basis, axis=0).min())


def prepare_spots(q: np.ndarray, photons: np.ndarray, tolerance: float, q_min: float, q_max: float,
                  max_spots: int) -> np.ndarray:
    """(n, 3) float64 spot vectors of one frame used for matching: inside [q_min, q_max], spots closer than
    2 tolerance merged (photon-weighted), the brightest ``max_spots`` kept."""
    norm = np.linalg.norm(q, axis=1)
    keep = (norm >= q_min) & (norm <= q_max)
    q, photons = q[keep], photons[keep]
    order = np.argsort(-photons, kind="stable")
    q, photons = q[order], photons[order]
    merged_q: list[np.ndarray] = []
    merged_w: list[float] = []
    for x, w in zip(q, photons):
        for i, y in enumerate(merged_q):
            if np.linalg.norm(x - y) < 2 * tolerance:
                merged_q[i] = (y * merged_w[i] + x * w) / (merged_w[i] + w)
                merged_w[i] += w
                break
        else:
            merged_q.append(x)
            merged_w.append(w)
    return np.asarray(merged_q[:max_spots], np.float64).reshape(-1, 3)


@jax.jit
def match_counts(quaternions: jax.Array, spots: jax.Array, spot_ok: jax.Array, basis: jax.Array,
                 basis_inv: jax.Array, tolerance_sq: jax.Array) -> jax.Array:
    """Spots within tolerance of a reciprocal-lattice point, per frame and rotation.

    Args:
      quaternions: (C, 4) float32 rotations.
      spots: (F, S, 3) float32 lab-frame spot vectors (1/Å), padded.
      spot_ok: (F, S) bool, False for padding.
      basis: (3, 3) reciprocal basis B (columns a*, b*, c*); basis_inv its inverse.
      tolerance_sq: () squared match radius (1/Å^2).

    Returns:
      (F, C) int32 number of matched spots.
    """
    n_frames, n_spots, _ = spots.shape
    rot = quaternion_to_matrix(quaternions)                     # (C, 3, 3), crystal = rot^T lab
    frac = jnp.einsum("ij,ckj->cik", basis_inv, rot)[:, :, None, :]  # B^-1 rot^T: (C, 3, 1, 3)
    s = spots.reshape(1, n_frames * n_spots, 3)
    # fractional hkl of every (rotation, spot) written out elementwise (not a matrix product), so that XLA
    # fuses it with the distance test and the sum over spots: no (C, 3, F*S) intermediate in memory
    # (5-8x faster on CPU than the matrix-product version)
    d0, d1, d2 = (h - jnp.round(h) for h in
                  (frac[:, i, :, 0] * s[..., 0] + frac[:, i, :, 1] * s[..., 1] + frac[:, i, :, 2] * s[..., 2]
                   for i in range(3)))
    g = basis.T @ basis  # metric tensor: |B d|^2 = d^T g d
    dist_sq = (g[0, 0] * d0 * d0 + g[1, 1] * d1 * d1 + g[2, 2] * d2 * d2
               + 2 * (g[0, 1] * d0 * d1 + g[0, 2] * d0 * d2 + g[1, 2] * d1 * d2))
    ok = (dist_sq <= tolerance_sq) & spot_ok.reshape(1, n_frames * n_spots)
    return jnp.sum(ok.reshape(-1, n_frames, n_spots), axis=-1, dtype=jnp.int32).T


class Orienter:
    """Scores batches of frames against every rotation of a 600-cell sampling (see the module docstring).

    With ``orbits`` (default) only one rotation per orbit of the grid-preserving point-group operations is
    scored (emcjax.frontend.grid_orbits; 4x fewer for 422) and every member of a candidate's orbit is a
    candidate with the same count: the lists equal those of the full search.
    """

    def __init__(self, crystal: Crystal, sampling_n: int, tolerance: float, chunk_rotations: int = 8192,
                 min_spots: int = 3, max_candidates: int = 0, orbits: bool = True):
        b = crystal.reciprocal_basis
        if tolerance >= 0.25 * float(np.linalg.norm(b, axis=0).min()):
            raise ConfigError(f"tolerance = {tolerance:.4g} 1/Å: expected < min|a*|/4 = "
                              f"{0.25 * float(np.linalg.norm(b, axis=0).min()):.4g} 1/Å")
        self.sampling = sample_600cell(sampling_n)
        self.orbits = grid_orbits(self.sampling, crystal.rotation_ops_cartesian) if orbits else None
        scored = self.sampling.quaternions if self.orbits is None else \
            self.sampling.quaternions[self.orbits.representative]
        self.n_scored = scored.shape[0]
        self.tolerance = tolerance
        self.min_spots = min_spots
        self.max_candidates = max_candidates
        self.chunk = min(chunk_rotations, self.n_scored)
        n_chunks = -(-self.n_scored // self.chunk)
        quats = np.zeros((n_chunks * self.chunk, 4), np.float32)
        quats[:self.n_scored] = scored
        quats[self.n_scored:, 0] = 1.0  # padding: identity, masked out below
        devices = jax.devices()
        self._chunks = [jax.device_put(quats[i * self.chunk:(i + 1) * self.chunk], devices[i % len(devices)])
                        for i in range(n_chunks)]
        self._consts = [tuple(jax.device_put(np.asarray(x, np.float32), d)
                              for x in (b, np.linalg.inv(b), tolerance**2)) for d in devices]
        self._n_dev = len(devices)

    def _to_grid(self, scored: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid indices (ascending) and counts of the scored rotations ``scored`` and their orbit mates."""
        if self.orbits is None:
            return scored, counts
        members = self.orbits.images[:, self.orbits.representative[scored]].astype(np.int64)  # (n_h, m)
        grid = members.ravel()
        counts = np.broadcast_to(counts, members.shape).ravel()
        grid, first = np.unique(grid, return_index=True)  # an orbit smaller than |H| repeats members
        return grid, counts[first]

    def candidates(self, spots: list[np.ndarray]) -> list[np.ndarray]:
        """Candidate rotation indices (ascending) for each frame's spots: the grid rotations matching at
        least ``min_spots`` spots, capped at ``max_candidates`` best-matching ones when set."""
        width = bucket_length(max((s.shape[0] for s in spots), default=1))
        padded = np.zeros((len(spots), width, 3), np.float32)
        ok = np.zeros((len(spots), width), bool)
        for i, s in enumerate(spots):
            padded[i, : s.shape[0]] = s
            ok[i, : s.shape[0]] = True
        inputs = [(jax.device_put(padded, d), jax.device_put(ok, d)) for d in jax.devices()]
        pending = []
        for i, chunk in enumerate(self._chunks):  # dispatch all chunks (asynchronous), then collect
            dev = i % self._n_dev
            pending.append(match_counts(chunk, *inputs[dev], *self._consts[dev]))
        hits: list[list[np.ndarray]] = [[] for _ in spots]
        scores: list[list[np.ndarray]] = [[] for _ in spots]
        for i, counts in enumerate(pending):
            counts = np.asarray(counts)
            frame, col = np.nonzero(counts >= self.min_spots)
            index = i * self.chunk + col
            real = index < self.n_scored
            for f in np.unique(frame[real]):
                sel = real & (frame == f)
                hits[f].append(index[sel])
                scores[f].append(counts[f, col[sel]])
        out = []
        for f, s in enumerate(spots):
            if s.shape[0] < self.min_spots or not hits[f]:
                out.append(np.zeros(0, np.int64))
                continue
            idx, sc = self._to_grid(np.concatenate(hits[f]), np.concatenate(scores[f]))
            if self.max_candidates and idx.size > self.max_candidates:
                idx = np.sort(idx[np.argsort(-sc, kind="stable")[: self.max_candidates]])
            out.append(idx.astype(np.int64))
        return out


def read_spots(file: h5py.File, start: int, stop: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Spot centroids (n, 3) and photons (n,) of frames [start, stop) from an open reduced data set."""
    if "spots" not in file:
        raise DataError(f"{file.filename}: group /spots is missing; expected a data set written by emcjax.reduce")
    off = file["spots/offsets"][start:stop + 1]
    q = file["spots/q"][off[0]:off[-1]].astype(np.float64)
    photons = file["spots/photons"][off[0]:off[-1]].astype(np.float64)
    rel = off - off[0]
    return ([q[rel[i]:rel[i + 1]] for i in range(stop - start)],
            [photons[rel[i]:rel[i + 1]] for i in range(stop - start)])


def run(config: OrientConfig, log=print) -> dict:
    """Writes ``config.out`` with candidate lists; returns statistics (frames, kept, candidate counts, s)."""
    from tqdm import tqdm

    with SparseDataset(config.data) as ds, h5py.File(config.data, "r") as f:
        crystal = Crystal(cell=tuple(ds.crystal["cell"]), space_group=str(ds.crystal["space_group"]))
        geometry = ds.geometry
        tolerance = config.tolerance or default_tolerance(crystal, config.vn, config.gw)
        q_max = 1.0 / (config.d_min or float(geometry["resolution_max_A"]))
        orienter = Orienter(crystal, config.sampling_n, tolerance, config.chunk_rotations, config.min_spots,
                            config.max_candidates, config.orbits)
        fingerprint = repr(dataclasses.replace(config, resume=False, overwrite=False, config=None))
        writer = SparseWriter(config.out, geometry, ds.crystal, ds.mask, ds.n_shells,
                              candidate_sampling_n=config.sampling_n, spots=True, fingerprint=fingerprint,
                              resume=config.resume, overwrite=config.overwrite)
        last = writer.last_frame_id()
        frame_ids = f["frames/frame_id"][()]
        start = 0 if last is None else int(np.searchsorted(frame_ids, last, side="right"))
        counts: list[int] = []
        n_spots: list[int] = []
        t0 = time.perf_counter()
        try:
            with tqdm(total=ds.n_frames, initial=start, unit="frame", desc="orient", disable=None,
                      file=sys.stderr) as bar:
                for a in range(start, ds.n_frames, config.block_frames):
                    b = min(a + config.block_frames, ds.n_frames)
                    block = ds.read_block(a, b)
                    q, photons = read_spots(f, a, b)
                    spots = [prepare_spots(x, w, tolerance, 0.0, q_max, config.max_spots) for x, w in zip(q, photons)]
                    lists = []
                    for c in range(0, b - a, config.frame_batch):
                        lists += orienter.candidates(spots[c:c + config.frame_batch])
                        bar.update(min(config.frame_batch, b - a - c))
                    counts += [x.size for x in lists]
                    n_spots += [s.shape[0] for s in spots]
                    keep = np.array([config.keep_empty or x.size > 0 for x in lists])
                    writer.append(*_with_candidates(block, f, a, b, lists, keep))
            path = writer.finish(truth_from=config.data if "truth" in f else None, normalise_phi=False)
        finally:
            writer.close()
    seconds = time.perf_counter() - t0
    counts_arr = np.asarray(counts)
    usable = np.asarray(n_spots) >= config.min_spots
    stats = {"frames": len(counts), "with_spots": int(usable.sum()), "kept": int((counts_arr > 0).sum()),
             "median_candidates": float(np.median(counts_arr[counts_arr > 0])) if (counts_arr > 0).any() else 0.0,
             "seconds": seconds, "frames_per_second": len(counts) / max(seconds, 1e-9), "path": str(path)}
    stats["figure"] = str(plot_candidate_counts(counts_arr, np.asarray(n_spots), config.min_spots,
                                                pathlib.Path(path).with_suffix(".candidates.png")))
    log(f"wrote {path}: {stats['kept']} of {stats['frames']} frames with candidates ({stats['with_spots']} with >= "
        f"{config.min_spots} spots), median {stats['median_candidates']:.0f} candidates per kept frame, "
        f"{orienter.sampling.n_rot} rotations, {stats['frames_per_second']:.2f} frames/s")
    return stats


def plot_candidate_counts(counts: np.ndarray, n_spots: np.ndarray, min_spots: int, path: pathlib.Path) -> pathlib.Path:
    """PNG: histograms of the spots per frame and of the candidates per frame (frames with >= min_spots)."""
    from emcjax import figures

    fig, axes = figures.plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].hist(n_spots, bins=np.arange(n_spots.max(initial=0) + 2) - 0.5)
    axes[0].axvline(min_spots - 0.5, color="k", ls="--")
    axes[0].set(xlabel="spots per frame (used)", ylabel="frames")
    usable = counts[n_spots >= min_spots]
    axes[1].hist(usable, bins=40)
    axes[1].set(xlabel="candidate rotations per frame", ylabel="frames",
                title=f"median {np.median(usable) if usable.size else 0:.0f}, {np.mean(usable == 0) if usable.size else 0:.1%} empty")
    fig.tight_layout()
    return figures.save_figure(fig, path)


def _with_candidates(block: SparseFrames, f: h5py.File, a: int, b: int, lists: list[np.ndarray],
                     keep: np.ndarray) -> tuple[SparseFrames, dict]:
    """The kept frames of ``block`` with their candidate lists, and their spots."""
    lists = [x for x, k in zip(lists, keep) if k]
    parts = [block.frame_slice(i, i + 1) for i in np.flatnonzero(keep)]
    if not parts:
        parts, lists = [block.frame_slice(0, 0)], []
    frames = SparseFrames.concatenate(parts)
    frames = dataclasses.replace(
        frames, candidate_offsets=np.concatenate([[0], np.cumsum([x.size for x in lists])]).astype(np.int64),
        candidate_rotations=np.concatenate(lists or [np.zeros(0, np.int64)]).astype(np.int64))
    off = f["spots/offsets"][a:b + 1]
    rows = [np.arange(off[i], off[i + 1]) - off[0] for i in np.flatnonzero(keep)]
    sel = np.concatenate(rows or [np.zeros(0, np.int64)]).astype(np.int64)
    spots = {"offsets": np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int64),
             "q": f["spots/q"][off[0]:off[-1]][sel], "photons": f["spots/photons"][off[0]:off[-1]][sel],
             "size": f["spots/size"][off[0]:off[-1]][sel],
             "initial_phi": f["spots/initial_phi"][a:b][keep]}
    return frames, spots


def main(argv: list[str] | None = None) -> None:
    """``python -m emcjax.orient [--config run.toml] [flags]``: errors become one line and a non-zero exit."""
    try:
        run(toml_config.parse_stage_args(OrientConfig, argv, "python -m emcjax.orient", __doc__.split("\n\n")[0]))
    except EmcjaxError as err:
        sys.exit(f"error: {err}")
