"""The reference program's own arrays and E-step, float for float (low-res-emc ``setup.c``, ``tomo.c``).

Everything here reproduces the C program's data types and operation order with numpy: pixel vectors and
polarization in float32 (``pix``, ``polar``, ``log_polar``), quaternions and their log weights in float32,
rotation matrices, backgrounds and log-likelihoods in float64, tomogram values rounded to float32
(``tomo_val``). It is the basis of the reference-compatible intensity update (:mod:`emcjax.legacy.refupdate`),
which exists to reproduce the program's numbers, not to be fast: numpy on the host, one rotation at a time.

Pixel membership: the program takes the pixels of a peak from make-Ematrix's bounding boxes (r2peak files)
and keeps those with ``|R p - v_h|^2 <= gw^2`` (voxel units) and at least one trilinear corner in S_h. Peaks
are at least VN > 2 gw voxels apart, so a pixel can only belong to its nearest lattice node; we test that
node directly instead of reading the boxes (a pixel that passes the EMC's test but lies outside make-Ematrix's
box, possible only at the float32 boundary, would differ).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np

from emcjax.errors import DataError
from emcjax.legacy.directory import LegacyDirectory
from emcjax.legacy.grid import lattice_points, c_round, reference_reciprocal

EPSILON = 1e-10  # the program's epsilon
CP_THRES = 0.999  # cumulative probability kept (recon.c)
P_MIN = 1e-4  # smallest probability kept (recon.c)


@dataclasses.dataclass
class ReferenceArrays:
    """The program's in-memory arrays (METHOD.md §2.15), float32 where it uses float.

    Attributes:
      pix: (num_pix, 3) float32 pixel vectors in voxel units (``pix`` after ``set_intens``).
      polar, log_polar: (num_pix,) float32.
      qid: (num_pix,) int64 radial bin of each pixel or -1.
      counts: (n_frames, num_pix) int64 photon counts, -1 = dead.
      background, log_bg: (n_frames, qlen) float64 ``ave_bg`` and ``log_bg`` (0 where B < epsilon).
      phi: (n_frames,) float64.
      rotation: (n_rot, 3, 3) float64 ``rot`` of each quaternion (from float32 quaternions).
      log_weight: (n_rot,) float32 normalised log prior.
      centre: (n_hkl, 3) float64 peak centres v_h in voxel units (``rvec * rescale``).
      box_origin: (n_hkl, 3) int64 ``round(v_h) - box_half_len``.
      box_voxel: (n_hkl, box_len^3) int64 global voxel index (into the model file) of each box cell, or -1.
      proj: (3, 3) float64 inverse of the reciprocal basis in voxel units (voxel -> fractional hkl).
      hkl_lookup: (2 hmax + 1, 2 kmax + 1, 2 lmax + 1) int64 row of the kept hkl table, or -1.
    """

    pix: np.ndarray
    polar: np.ndarray
    log_polar: np.ndarray
    qid: np.ndarray
    counts: np.ndarray
    background: np.ndarray
    log_bg: np.ndarray
    phi: np.ndarray
    rotation: np.ndarray
    log_weight: np.ndarray
    centre: np.ndarray
    box_origin: np.ndarray
    box_voxel: np.ndarray
    box_len: int
    proj: np.ndarray
    hkl_lookup: np.ndarray
    gw: float

    def peak_rows(self, hkl: np.ndarray) -> np.ndarray:
        """(n,) int64 row of the kept hkl table of each (n, 3) integer hkl, -1 if not kept."""
        half = (np.array(self.hkl_lookup.shape) - 1) // 2
        idx = np.asarray(hkl, np.int64) + half
        inside = np.all((idx >= 0) & (idx < np.array(self.hkl_lookup.shape)), axis=1)
        idx = np.where(inside[:, None], idx, 0)
        return np.where(inside, self.hkl_lookup[idx[:, 0], idx[:, 1], idx[:, 2]], -1)


def rotation_matrices(quaternions: np.ndarray) -> np.ndarray:
    """``make_rot`` (tomo.c) for (n, 4) quaternions given as float32: (n, 3, 3) float64 (METHOD.md §1)."""
    q = np.asarray(quaternions, np.float32).astype(np.float64)
    q0, q1, q2, q3 = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    q01, q02, q03, q11, q12, q13 = q0 * q1, q0 * q2, q0 * q3, q1 * q1, q1 * q2, q1 * q3
    q22, q23, q33 = q2 * q2, q2 * q3, q3 * q3
    return np.stack([
        np.stack([1.0 - 2.0 * (q22 + q33), 2.0 * (q12 + q03), 2.0 * (q13 - q02)], -1),
        np.stack([2.0 * (q12 - q03), 1.0 - 2.0 * (q11 + q33), 2.0 * (q01 + q23)], -1),
        np.stack([2.0 * (q02 + q13), 2.0 * (q23 - q01), 1.0 - 2.0 * (q11 + q22)], -1),
    ], axis=1)


def reference_arrays(legacy: LegacyDirectory) -> ReferenceArrays:
    """The program's arrays for a directory read by :func:`emcjax.legacy.read_legacy`."""
    g = legacy.geometry
    ref = legacy.ref_grid
    qmin_px, qmax_px, qcut_px = legacy.pixel_limits
    sx, sy, sz = (float(x) for x in g.beam_direction)
    distance = (g.distance_m / g.pixel_size_m) * math.sqrt((sx * sx + sy * sy) + sz * sz) / abs(sz)
    scale = 1.0 / g.wavelength_A / distance
    rmax2 = (qcut_px * scale) ** 2
    q = legacy.q_px
    norm = ((0.0 + (q[:, 0] * scale) ** 2) + (q[:, 1] * scale) ** 2) + (q[:, 2] * scale) ** 2
    beyond = np.flatnonzero(norm > rmax2)
    num_pix = int(beyond[0]) if beyond.size else q.shape[0]
    pix32 = q[:num_pix].astype(np.float32)
    sq = pix32 * pix32  # float products, double sum (setup.c)
    dist = np.sqrt(((0.0 + sq[:, 0].astype(np.float64)) + sq[:, 1]) + sq[:, 2])
    qid = c_round(dist / (float(qmax_px) / g.n_shells) - 0.5).astype(np.int64)
    qid = np.where((qid < 0) | (qid > g.n_shells - 1), -1, qid)
    polar = legacy.polarization[:num_pix].astype(np.float32)
    log_polar = np.log(polar.astype(np.float64)).astype(np.float32)
    rl = reference_reciprocal(legacy.basis)
    min_rcell = math.sqrt(float(np.min(((0.0 + rl[0] ** 2) + rl[1] ** 2) + rl[2] ** 2)))
    rescale = legacy.vn / min_rcell
    pix = (pix32.astype(np.float64) * (legacy.vn / min_rcell / (g.wavelength_A * distance))).astype(np.float32)

    frames = legacy.frames
    position = np.full(g.num_pixels, -1, np.int64)
    position[legacy.pixel_of[:num_pix]] = np.arange(num_pix)
    counts = np.zeros((frames.n_frames, num_pix), np.int64)
    for d in range(frames.n_frames):
        sl = slice(frames.photon_offsets[d], frames.photon_offsets[d + 1])
        t = position[frames.photon_pixels[sl]]
        counts[d, t[t >= 0]] = frames.photon_counts[sl][t >= 0]
        t = position[frames.dead_pixels[frames.dead_offsets[d]:frames.dead_offsets[d + 1]]]
        counts[d, t[t >= 0]] = -1
    background = np.asarray(legacy.background, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_bg = np.where(background < EPSILON, 0.0, np.log(np.maximum(background, EPSILON)))

    quats = np.asarray(legacy.quaternions).astype(np.float32)
    weight = quats[:, 4]
    total = 0.0
    for w in weight.astype(np.float64):  # sequential double sum of the float weights
        total += w
    normalised = (weight.astype(np.float64) * (1.0 / total)).astype(np.float32)
    log_weight = np.log(normalised.astype(np.float64)).astype(np.float32)

    centre = lattice_points(rl, ref.hkl) * rescale
    ext = int(math.ceil(legacy.gw)) + 1
    box_len = 2 * ext + 1
    origin = c_round(centre).astype(np.int64) - ext
    local = ref.voxels - origin[ref.owner]
    box_voxel = np.full((ref.hkl.shape[0], box_len**3), -1, np.int64)
    box_voxel[ref.owner, (local[:, 0] * box_len + local[:, 1]) * box_len + local[:, 2]] = np.arange(ref.n_voxels)
    lookup = np.full([2 * m + 1 for m in ref.box], -1, np.int64)
    lookup[tuple((ref.hkl + np.array(ref.box)).T)] = np.arange(ref.hkl.shape[0])
    return ReferenceArrays(
        pix=pix, polar=polar, log_polar=log_polar, qid=qid, counts=counts, background=background, log_bg=log_bg,
        phi=np.asarray(legacy.phi, np.float64), rotation=rotation_matrices(quats[:, :4]), log_weight=log_weight,
        centre=centre, box_origin=origin, box_voxel=box_voxel, box_len=box_len,
        proj=np.linalg.inv(rl * rescale), hkl_lookup=lookup,
        gw=float(legacy.gw),
    )


@dataclasses.dataclass
class Tomogram:
    """The pixels of one rotation that fall in a kept peak (the program's tomogram and Emat rows).

    Attributes:
      pixel: (n,) int64 pixel index t (rec-vectors order), grouped by peak, ascending within a peak.
      peak: (n,) int64 row of the hkl table.
      voxel: (n, 8) int64 global voxel index of each trilinear corner, -1 where the corner is not in S_h.
      weight: (n, 8) float64 corner weights ``cx*cy*cz`` (0 where absent).
    """

    pixel: np.ndarray
    peak: np.ndarray
    voxel: np.ndarray
    weight: np.ndarray

    def values(self, intensity: np.ndarray) -> np.ndarray:
        """``tomo_val``: W at each pixel, corners summed in order, rounded to float32 (as float64)."""
        total = np.zeros(self.pixel.shape[0])
        for k in range(8):
            present = self.voxel[:, k] >= 0
            total = total + np.where(present, self.weight[:, k] * intensity[np.maximum(self.voxel[:, k], 0)], 0.0)
        return total.astype(np.float32).astype(np.float64)


_CORNERS = [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]


def tomogram(arrays: ReferenceArrays, r: int) -> Tomogram:
    """The tomogram pixels of rotation ``r`` and their trilinear corners (tomo.c ``calprob``/``compress``)."""
    rot = arrays.rotation[r]
    p = arrays.pix.astype(np.float64)
    u = np.stack([(rot[i, 0] * p[:, 0] + rot[i, 1] * p[:, 1]) + rot[i, 2] * p[:, 2] for i in range(3)], axis=1)
    node = c_round(u @ arrays.proj.T).astype(np.int64)
    peak = arrays.peak_rows(node)
    cand = np.flatnonzero(peak >= 0)
    u, peak = u[cand], peak[cand]
    diff = u - arrays.centre[peak]
    dr2 = (diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1]) + diff[:, 2] * diff[:, 2]
    keep = dr2 <= arrays.gw * arrays.gw
    cand, u, peak = cand[keep], u[keep], peak[keep]
    base = np.trunc(u - arrays.box_origin[peak]).astype(np.int64)  # C's (int) conversion
    frac = u - np.floor(u)
    half = (arrays.box_len - 1) // 2
    voxel = np.full((cand.shape[0], 8), -1, np.int64)
    weight = np.zeros((cand.shape[0], 8))
    for k, c in enumerate(_CORNERS):
        corner = base + np.array(c)
        inside = np.all(np.abs(corner - half) <= half, axis=1)
        cell = (np.clip(corner[:, 0], 0, arrays.box_len - 1) * arrays.box_len
                + np.clip(corner[:, 1], 0, arrays.box_len - 1)) * arrays.box_len + np.clip(corner[:, 2], 0, arrays.box_len - 1)
        v = np.where(inside, arrays.box_voxel[peak, cell], -1)
        f = [np.where(c[i] == 1, frac[:, i], 1.0 - frac[:, i]) for i in range(3)]
        voxel[:, k] = v
        weight[:, k] = np.where(v >= 0, (f[0] * f[1]) * f[2], 0.0)
    used = np.any(voxel >= 0, axis=1)
    order = np.lexsort((cand[used], peak[used]))
    return Tomogram(pixel=cand[used][order], peak=peak[used][order], voxel=voxel[used][order],
                    weight=weight[used][order])


def log_offsets(arrays: ReferenceArrays) -> np.ndarray:
    """``logP_offset`` per frame: sum over valid pixels of K (log B + log pol) - B pol (max.c)."""
    bg = arrays.background[:, np.maximum(arrays.qid, 0)]
    valid = (arrays.qid >= 0)[None, :] & (bg >= EPSILON) & (arrays.counts >= 0)
    lb = arrays.log_bg[:, np.maximum(arrays.qid, 0)] + arrays.log_polar.astype(np.float64)[None, :]
    terms = np.where(valid, arrays.counts * lb - bg * arrays.polar.astype(np.float64)[None, :], 0.0)
    return terms.sum(axis=1)


def responsibilities(arrays: ReferenceArrays, candidates: list[np.ndarray], tomograms: dict[int, Tomogram],
                     intensity: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The E-step of an intensity pass (odd iter_flag, tomo.c ``calprob``), pruned like the program.

    Returns per frame (rotation ids ascending, kept probabilities) after the 0.999 / 1e-4 pruning and
    renormalisation (METHOD.md §6.3-6.5).
    """
    offsets = log_offsets(arrays)
    n_frames = arrays.counts.shape[0]
    logp = [np.zeros(c.shape[0]) for c in candidates]
    frames_of: dict[int, list[tuple[int, int]]] = {}
    for d, c in enumerate(candidates):
        for i, r in enumerate(c.tolist()):
            frames_of.setdefault(r, []).append((d, i))
    for r, pairs in frames_of.items():
        tomo = tomograms[r]
        w_r = tomo.values(intensity)
        t = tomo.pixel
        pol = arrays.polar[t].astype(np.float64)
        lpol = arrays.log_polar[t].astype(np.float64)
        qid = arrays.qid[t]
        ds = np.array([d for d, _ in pairs])
        bv = arrays.background[np.ix_(ds, np.maximum(qid, 0))]
        k = arrays.counts[np.ix_(ds, t)]
        phi = arrays.phi[ds][:, None]
        valid = (qid >= 0)[None, :] & (bv >= EPSILON) & (k >= 0)
        signal = w_r[None, :] * phi * pol[None, :]
        lam = signal + bv * pol[None, :]
        tiny = lam < EPSILON  # the pixel's Bragg term is dropped
        with np.errstate(divide="ignore", invalid="ignore"):
            photon = np.where(k > 0, k * ((np.log(lam) - arrays.log_bg[np.ix_(ds, np.maximum(qid, 0))]) - lpol[None, :]), 0.0)
        terms = np.where(valid & ~tiny, photon - signal, 0.0)
        total = terms.sum(axis=1)
        value = (arrays.log_weight[r].astype(np.float64) + offsets[ds]) + np.where(arrays.phi[ds] > EPSILON, total, 0.0)
        for (d, i), v in zip(pairs, value.tolist()):
            logp[d][i] = v
    out = []
    for d in range(n_frames):
        ids, lp = candidates[d], logp[d]
        if ids.shape[0] == 0:
            out.append((ids, lp))
            continue
        p = np.exp(lp - lp.max())
        p = p * (1.0 / p.sum())
        if ids.shape[0] == 1:
            out.append((ids, p))
            continue
        order = np.argsort(-p, kind="stable")
        cum, count = 0.0, 0
        for x in p[order]:
            if x < P_MIN:
                break
            cum += x
            count += 1
            if cum > CP_THRES:
                break
        keep = order[:count]
        probs = p[keep] * (1.0 / cum) if count else p[keep]
        srt = np.argsort(ids[keep])
        out.append((ids[keep][srt], probs[srt]))
    return out


def read_high_p(directory: str | pathlib.Path, n_frames: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The program's ``high_p-<rank>.dat`` files of one iter_flag directory, ranks concatenated (= frame order).

    Returns per frame (rotation ids ascending, probabilities as written, %.6f).
    """
    directory = pathlib.Path(directory)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    rank = 0
    while len(out) < n_frames:
        path = directory / f"high_p-{rank}.dat"
        what = "text: n_frames, then per frame a count and count pairs 'rotation probability'"
        if not path.exists():
            raise DataError(f"{path}: no such file; expected the high_p files of {n_frames} frames ({what})")
        tokens = path.read_text().split()
        n, pos = int(tokens[0]), 1
        for _ in range(n):
            c = int(tokens[pos])
            pairs = np.array(tokens[pos + 1:pos + 1 + 2 * c], np.float64).reshape(c, 2)
            pos += 1 + 2 * c
            order = np.argsort(pairs[:, 0])
            out.append((pairs[order, 0].astype(np.int64), pairs[order, 1]))
        rank += 1
    if len(out) != n_frames:
        raise DataError(f"{directory}: high_p files hold {len(out)} frames; expected {n_frames}")
    return out
