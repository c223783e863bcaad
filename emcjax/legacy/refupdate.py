"""The reference program's intensity update, rule for rule (low-res-emc ``max.c``: ``maximize``, ``sym_intens``).

One odd iter_flag pass of the program on its own Cartesian grid: per entry e = (rotation, pixel) the 1-D
Poisson problem ``S_e(w) = sum_k C_k (B_k + w) - A_k (log(B_k + w) + D_k)`` is minimised by the program's
bracketing and golden-section search (tolerance 1e-3 relative, 200 steps), with its special cases (no
photon: ``w = -min B``, negative model values; ``|S'(0)| < 1e-10``: w = 0); the entries are compressed onto
voxels with weights ``P phi omega``; then every voxel becomes the mean of its Laue mates (``sym_intens``,
equal weights over the operators of sym-op.dat). Observation values are float32 where the program stores
them as float (``A = P K``, ``B = B_d / phi``), sums run in the program's order (observations by frame).

This is a parity tool (docs/LEGACY.md): emcjax's own intensity update (``emcjax.core.mstep``) is the default for
runs; this one reproduces the program's ``finish_intensity.bin`` from its start model and phi.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from emcjax.errors import DataError
from emcjax.legacy.directory import LegacyDirectory
from emcjax.legacy.grid import lattice_points, c_round, reference_reciprocal
from emcjax.legacy.refmodel import (EPSILON, ReferenceArrays, Tomogram, reference_arrays, responsibilities,
                                    tomogram)

GOLDEN_RATIO = 1.618034  # recon.c
TOLERANCE = 1e-3  # relative golden-section tolerance of the intensity pass (max.c)
MAX_STEPS = 200


def _objective(w: np.ndarray, obs: dict, rows: np.ndarray) -> np.ndarray:
    """S_e(w) for the entries ``rows``, summed over observations in order (NaN/inf as the C gives them)."""
    total = np.zeros(rows.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(obs["A"].shape[1]):
            x = obs["B"][rows, k] + w
            term = obs["C"][rows, k] * x - obs["A"][rows, k] * (np.log(x) + obs["D"][rows, k])
            total = total + np.where(obs["valid"][rows, k], term, 0.0)
    return total


def solve_entries(A: np.ndarray, B: np.ndarray, C: np.ndarray, D: np.ndarray,
                  valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The program's per-entry ML value (max.c ``maximize``), vectorised over entries.

    Args:
      A, B: (n_entries, n_obs) float64 holding the float32 values P K and B_d / phi (-1 = skipped).
      C, D: (n_entries, n_obs) float64 P phi pol and log(phi pol).
      valid: (n_entries, n_obs) bool, observation present and A >= 0 and B >= 0.

    Returns:
      (w (n_entries,) float64, skip (n_entries,) bool: entries without a valid observation).
    """
    obs = {"A": A, "B": B, "C": C, "D": D, "valid": valid}
    n = A.shape[0]
    skip = ~valid.any(axis=1)
    w = np.zeros(n)
    everything = np.arange(n)
    s_a = _objective(np.zeros(n), obs, everything)
    grad = np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(A.shape[1]):
            grad = grad + np.where(valid[:, k], C[:, k] - A[:, k] / B[:, k], 0.0)
    flat = ~skip & (np.abs(grad) < EPSILON)
    no_photon = ~skip & ~flat & ~np.any(valid & (A > EPSILON), axis=1)
    w[no_photon] = np.max(np.where(valid, -B, -np.inf), axis=1)[no_photon]
    rows = np.flatnonzero(~skip & ~flat & ~no_photon)
    g, sa = grad[rows], s_a[rows]
    # bracket: w_b = -lambda g, lambda doubling until S(w_b) > S(0) or some B + w_b < epsilon
    lam = np.ones(rows.shape[0])
    overshoot = np.zeros(rows.shape[0], bool)
    open_ = np.ones(rows.shape[0], bool)
    for _ in range(2100):
        idx = np.flatnonzero(open_)
        if idx.size == 0:
            break
        wb = 0.0 - lam[idx] * g[idx]
        over = np.any(obs["valid"][rows[idx]] & (B[rows[idx]] + wb[:, None] < EPSILON), axis=1)
        sb = _objective(wb, obs, rows[idx])
        overshoot[idx] = over
        done = over | (sb > sa[idx])
        open_[idx[done]] = False
        lam[idx[~done]] *= 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        limit = np.min(np.where(valid[rows], B[rows] / g[:, None], np.inf), axis=1)
    clip = overshoot & (g > 0.0)
    lam = np.where(clip, np.minimum(lam, limit), lam)
    # golden-section search
    inv_tau = 1.0 / GOLDEN_RATIO
    wa = np.zeros(rows.shape[0])
    wb = wa - lam * g
    wc, wd = wa.copy(), wb.copy()
    steps = np.zeros(rows.shape[0], np.int64)
    for _ in range(MAX_STEPS):
        dv = wb - wa
        mid = (wb + wa) / 2.0
        go = (np.sqrt(dv * dv) > TOLERANCE * np.sqrt(mid * mid)) & (steps < MAX_STEPS)
        idx = np.flatnonzero(go)
        if idx.size == 0:
            break
        dv = (wb[idx] - wa[idx]) * inv_tau
        wc[idx] = wb[idx] - dv
        wd[idx] = wa[idx] + dv
        sc = _objective(wc[idx], obs, rows[idx])
        sd = _objective(wd[idx], obs, rows[idx])
        lower = sc < sd
        wb[idx[lower]] = wd[idx[lower]]
        wa[idx[~lower]] = wc[idx[~lower]]
        steps[idx] += 1
    w[rows] = np.where(steps == 0, (wa + wb) / 2.0, (wc + wd) / 2.0)
    return w, skip


@dataclasses.dataclass
class ReferenceUpdate:
    """One intensity pass of the program.

    Attributes:
      intensity: (n_voxels,) float64 the new model in finish_intensity.bin order.
      compressed: (n_voxels,) float64 before symmetrisation.
      hkl_sums: (n_hkl,) float64 sum of each reflection's voxels (hkl-val.dat).
      kept: per frame (rotation ids, probabilities) used.
      n_entries: number of (rotation, pixel) entries solved.
    """

    intensity: np.ndarray
    compressed: np.ndarray
    hkl_sums: np.ndarray
    kept: list
    n_entries: int


def _compress(arrays: ReferenceArrays, tomograms: dict[int, Tomogram], kept: list, n_voxels: int):
    """Per-entry solve and compress (max.c ``maximize``): the new voxel values before symmetrisation."""
    pairs: dict[int, list[tuple[int, float]]] = {}
    for d, (ids, probs) in enumerate(kept):
        if arrays.phi[d] < EPSILON:
            continue
        for r, p in zip(ids.tolist(), probs.tolist()):
            pairs.setdefault(r, []).append((d, p))
    rots = sorted(pairs)
    n_obs = max((len(v) for v in pairs.values()), default=1)
    blocks = []
    for r in rots:
        tomo = tomograms[r]
        t = tomo.pixel
        ds = np.array([d for d, _ in pairs[r]])
        ps = np.array([p for _, p in pairs[r]])
        phi = arrays.phi[ds]
        k = arrays.counts[np.ix_(ds, t)].T  # (n_pix, n_pairs)
        qid = arrays.qid[t]
        bv = arrays.background[np.ix_(ds, np.maximum(qid, 0))].T
        pol = arrays.polar[t].astype(np.float64)[:, None]
        a = np.where(k < 0, -1.0, (ps[None, :] * k).astype(np.float32).astype(np.float64))
        b = np.where((qid[:, None] < 0) | (bv < EPSILON), -1.0, (bv / phi[None, :]).astype(np.float32).astype(np.float64))
        c = (ps * phi)[None, :] * pol
        dd = np.log(phi[None, :] * pol)
        pad = ((0, 0), (0, n_obs - ds.shape[0]))
        blocks.append([np.pad(x, pad) for x in (a, b, c, dd)] + [np.pad((a >= 0) & (b >= 0), pad)])
    A, B, C, D, valid = (np.concatenate([blk[i] for blk in blocks]) for i in range(5))
    w, skip = solve_entries(A, B, C, D, valid)
    vox_val, weight_sum = np.zeros(n_voxels), np.zeros(n_voxels)
    start = 0
    contributions = []
    for r in rots:
        tomo = tomograms[r]
        n = tomo.pixel.shape[0]
        w_r, use = w[start:start + n], ~skip[start:start + n]
        start += n
        for d, p in pairs[r]:
            contributions.append((d, r, tomo, w_r, use, p * arrays.phi[d]))
    contributions.sort(key=lambda x: (x[0], x[1]))  # the program's pair order: frames, then rotation ids
    voxels, weights, values = [], [], []
    for _, _, tomo, w_r, use, val in contributions:
        vox, wt = tomo.voxel[use].ravel(), (val * tomo.weight[use]).ravel()
        present = vox >= 0
        voxels.append(vox[present])
        weights.append(wt[present])
        values.append((wt * np.repeat(w_r[use], 8))[present])
    if voxels:  # bincount adds in input order, like the program's loops
        voxels = np.concatenate(voxels)
        vox_val = np.bincount(voxels, weights=np.concatenate(values), minlength=n_voxels)
        weight_sum = np.bincount(voxels, weights=np.concatenate(weights), minlength=n_voxels)
    inv = np.where(weight_sum > EPSILON, 1.0 / np.where(weight_sum > EPSILON, weight_sum, 1.0), 0.0)
    return np.where(weight_sum > EPSILON, vox_val * inv, vox_val), int(A.shape[0])


def symmetrize(legacy: LegacyDirectory, arrays: ReferenceArrays, values: np.ndarray) -> np.ndarray:
    """``sym_intens`` (max.c): every box cell of S_h becomes the mean of what the operators of sym-op.dat
    splat onto it (trilinear, equal weights); cells nothing lands on keep their value."""
    ref = legacy.ref_grid
    rl = reference_reciprocal(legacy.basis)
    proj = np.linalg.inv(rl)
    n_hkl, cells = arrays.box_voxel.shape
    total, weight = np.zeros((n_hkl, cells)), np.zeros((n_hkl, cells))
    rvec = lattice_points(rl, ref.hkl)
    vec = ref.voxels.astype(np.float64)
    half = (arrays.box_len - 1) // 2
    for S in np.asarray(legacy.sym_ops, np.float64):
        rot = np.stack([(S[i, 0] * rvec[:, 0] + S[i, 1] * rvec[:, 1]) + S[i, 2] * rvec[:, 2] for i in range(3)], 1)
        target = c_round(np.stack([(proj[i, 0] * rot[:, 0] + proj[i, 1] * rot[:, 1]) + proj[i, 2] * rot[:, 2]
                                   for i in range(3)], 1)).astype(np.int64)
        row = arrays.peak_rows(target)[ref.owner]
        rv = np.stack([(S[i, 0] * vec[:, 0] + S[i, 1] * vec[:, 1]) + S[i, 2] * vec[:, 2] for i in range(3)], 1)
        base = np.trunc(rv - arrays.box_origin[np.maximum(row, 0)]).astype(np.int64)
        frac = rv - np.floor(rv)
        for c in [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]:
            corner = base + np.array(c)
            ok = (row >= 0) & np.all(np.abs(corner - half) <= half, axis=1)
            f = [np.where(c[i] == 1, frac[:, i], 1.0 - frac[:, i]) for i in range(3)]
            w = (f[0] * f[1]) * f[2]
            cell = (corner[:, 0] * arrays.box_len + corner[:, 1]) * arrays.box_len + corner[:, 2]
            flat = row[ok] * cells + cell[ok]
            total += np.bincount(flat, weights=(w * values)[ok], minlength=n_hkl * cells).reshape(n_hkl, cells)
            weight += np.bincount(flat, weights=w[ok], minlength=n_hkl * cells).reshape(n_hkl, cells)
    out = values.copy()
    hit = (arrays.box_voxel >= 0) & (weight != 0.0)
    out[arrays.box_voxel[hit]] = total[hit] / weight[hit]
    return out


def reference_update(legacy: LegacyDirectory, kept: list | None = None,
                     intensity: np.ndarray | None = None) -> ReferenceUpdate:
    """One intensity pass of the program from the directory's start model and phi.

    Args:
      legacy: a directory read by :func:`emcjax.legacy.read_legacy`.
      kept: per frame (rotation ids, probabilities) to use instead of this module's E-step (e.g. the
        program's own ``high_p`` files, :func:`emcjax.legacy.refmodel.read_high_p`).
      intensity: start model (reference voxel values; default: the directory's).
    """
    if intensity is None and legacy.intensity is None:
        raise DataError(f"{legacy.root / 'config.ini'}: no start model (start_intens_file); expected one, or pass "
                        "intensity (the program's random start is not reproducible: unseeded rand())")
    arrays = reference_arrays(legacy)
    model = np.asarray(legacy.intensity if intensity is None else intensity, np.float64)
    fr = legacy.frames
    candidates = [fr.candidate_rotations[fr.candidate_offsets[d]:fr.candidate_offsets[d + 1]]
                  for d in range(fr.n_frames)]
    needed = np.unique(np.concatenate(candidates)) if kept is None else np.unique(np.concatenate([k[0] for k in kept]))
    tomograms = {int(r): tomogram(arrays, int(r)) for r in needed}
    if kept is None:
        kept = responsibilities(arrays, candidates, tomograms, model)
    compressed, n_entries = _compress(arrays, tomograms, kept, legacy.ref_grid.n_voxels)
    new = symmetrize(legacy, arrays, compressed)
    sums = np.add.reduceat(new, legacy.ref_grid.offsets[:-1]) if new.size else np.zeros(0)
    return ReferenceUpdate(intensity=new, compressed=compressed, hkl_sums=sums, kept=kept, n_entries=n_entries)
