"""Per-frame radial background with Poisson outlier rejection, and ice/powder ring shells (METHOD.md §2.2).

For one frame with raw counts K_t on the valid pixels t (emcjax.detector: unmasked, inside the resolution
limits), radial shell s_t and polarization x solid-angle factor pol_t (the EMC's own normalisation):

1. B(s) = sum_{t in s, kept} K_t / sum_{t in s, kept} pol_t: photons per pixel per unit pol (the unit of
   ``/frames/background``).
2. ``iterations`` times: a pixel is an outlier when K_t > k(lambda_t), lambda_t = max(B(s_t) pol_t, 0.01),
   with k(lambda) the smallest k whose Poisson CDF reaches ``quantile`` (0.99999 as in the reference);
   the outliers are the Bragg-spot candidates. B is re-estimated without the outliers and their 8
   neighbours (the weak tails of spots; the reference drops only the outliers), and, with
   ``clip_quantile``, also without the pixels above c_t = max(k(lambda_t) at that lower level, 1), by the
   maximum-likelihood rate of a Poisson truncated at c_t (so that clipping pure background biases
   nothing): B = sum K_t / sum pol_t (1 - p(c_t; mu_t) / P(K <= c_t; mu_t)), mu_t = B pol_t, iterated to
   its fixed point. A deviation from the reference (plain mean): weak Bragg spots, whose pixels hold a few
   photons each and are no outliers, stay out of the background too (at 150 Bragg photons per frame
   on 0.3 background photons per pixel the plain mean is 2-5 % high per shell, docs/METHOD-NOTES.md).
   With ``neighbour_quantile``, a pixel is also left out when the photons on its valid 8-neighbours exceed
   their Poisson level at that quantile (mean: the sum of their B(s) pol): for Poisson background this
   depends on the neighbours only, not on the pixel's own count, so it biases nothing; it drops the
   photons of weak spots spread over adjacent pixels, which a count test cannot see where the background is
   ~0.01-0.05 photons per pixel (one Bragg photon on a pixel then passes as background).
3. Rings: strict local maxima of B over +-2 shells are followed down to their flanking minima; a maximum
   is a ring when it exceeds the linear interpolation between the minima by more than ``ring_excess``
   (5 %, as the reference) *and* its excess photons over the higher flank are significant (> ``ring_sigma``
   Poisson standard deviations) and at least ``min_photons``. The excluded shells (B = -1) are those around the maximum still 2 sigma
   above the higher flank, plus one on each side. The reference has no significance test and excludes
   everything between the minima, so on sparse frames every noise bump would exclude shells -- a
   deliberate deviation (docs/METHOD-NOTES.md).

Shells without a valid pixel get B = 0. Pure numpy, one frame at a time (memory independent of the
number of frames).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage, special, stats

from emcjax.detector import Detector, DetectorGeometry, make_detector

LAMBDA_FLOOR = 0.01  # photons: the reference's lower end of the threshold table


@dataclasses.dataclass(frozen=True, eq=False)
class RadialTables:
    """Per-pixel tables of one detector (static mask applied).

    Attributes:
      detector: the valid pixels (emcjax.detector.make_detector with the static mask).
      q_full: (num_rows * num_cols, 3) float64 lab-frame q of every raw pixel in 1/Å (no mask, no limits;
        the reference computes spot centroids from the unmasked full geometry).
      shell_full: (num_rows * num_cols,) int32 shell of every valid raw pixel, -1 elsewhere.
      shell_pol: (n_shells,) float64 sum of pol over the valid pixels of each shell.
    """

    detector: Detector
    q_full: np.ndarray
    shell_full: np.ndarray
    shell_pol: np.ndarray

    @property
    def geometry(self) -> DetectorGeometry:
        return self.detector.geometry


def full_detector(geometry: DetectorGeometry) -> Detector:
    """Every raw pixel of the detector (no beam stop, no resolution limit, no mask), sorted by |q|; its
    polarization is normalised over all pixels."""
    everything = dataclasses.replace(geometry, beamstop_radius_px=0.0, resolution_max_A=geometry.wavelength_A / 2.0001)
    return make_detector(everything)


def radial_tables(geometry: DetectorGeometry, mask: np.ndarray | None) -> RadialTables:
    """Tables of ``geometry`` with the static ``mask`` (num_rows, num_cols) bool, True = bad."""
    detector = make_detector(geometry, mask)
    full = full_detector(geometry)
    q_full = np.empty((geometry.num_pixels, 3))
    q_full[full.pixel_id] = full.q
    shell_full = np.full(geometry.num_pixels, -1, np.int32)
    shell_full[detector.pixel_id] = detector.shell
    shell_pol = np.bincount(detector.shell, weights=detector.polarization, minlength=geometry.n_shells)
    return RadialTables(detector, q_full, shell_full, shell_pol)


_TABLE_MAX = 1e4  # photons: beyond, thresholds are computed exactly (rare pixels)


@functools.lru_cache(maxsize=8)
def _threshold_table(quantile: float) -> tuple[np.ndarray, np.ndarray]:
    # steps of 0.5 % in lam, at most 0.25 photons: adjacent thresholds differ by at most one count
    lam, x = [LAMBDA_FLOOR], LAMBDA_FLOOR
    while x < _TABLE_MAX:
        x += min(0.005 * x, 0.25)
        lam.append(x)
    lam = np.asarray(lam)
    return lam, stats.poisson.ppf(quantile, lam).astype(np.int64)


def poisson_threshold(lam: np.ndarray, quantile: float = 0.99999) -> np.ndarray:
    """Smallest k with Poisson CDF(k; lam) >= quantile, for lam >= 0.01 (int64, same shape as lam).

    Tabulated on a grid of lam (steps of 0.5 %, at most 0.25) and read at the grid point at or above lam,
    so the threshold is never below the exact one and at most one count above it.
    """
    lam = np.maximum(np.asarray(lam, np.float64), LAMBDA_FLOOR)
    lam_grid, k_grid = _threshold_table(float(quantile))
    out = k_grid[np.minimum(np.searchsorted(lam_grid, lam), lam_grid.size - 1)]
    big = lam > _TABLE_MAX
    if big.any():
        out = np.where(big, 0, out)
        out[big] = stats.poisson.ppf(quantile, lam[big]).astype(np.int64)
    return out


def _dilate(outlier: np.ndarray, tables: RadialTables) -> np.ndarray:
    """Valid pixels that are outliers or 8-neighbours of one (the weak tails of spots)."""
    g = tables.geometry
    raw = np.zeros(g.num_pixels, bool)
    raw[tables.detector.pixel_id[outlier]] = True
    grown = ndimage.binary_dilation(raw.reshape(g.num_rows, g.num_cols), structure=np.ones((3, 3), bool))
    return grown.ravel()[tables.detector.pixel_id]


def _neighbour_sum(values: np.ndarray, tables: RadialTables) -> np.ndarray:
    """(n_pix,) sum of ``values`` (n_pix,) over each valid pixel's valid 8-neighbours (the pixel excluded)."""
    g = tables.geometry
    raw = np.zeros(g.num_pixels)
    raw[tables.detector.pixel_id] = values
    window = ndimage.convolve(raw.reshape(g.num_rows, g.num_cols), np.ones((3, 3)), mode="constant")
    return window.ravel()[tables.detector.pixel_id] - values


def _truncated_rate(k: np.ndarray, cap: np.ndarray, keep: np.ndarray, tables: RadialTables,
                    start: np.ndarray, steps: int = 20) -> np.ndarray:
    """(n_shells,) maximum-likelihood B of Poisson counts ``k`` with means B(s_t) pol_t, each truncated at
    ``cap`` (counts > cap were dropped), over the pixels ``keep``; fixed-point iteration from ``start``."""
    det = tables.detector
    n_shells = det.geometry.n_shells
    num = np.bincount(det.shell, weights=np.where(keep, k, 0.0), minlength=n_shells)
    b = start.copy()
    for _ in range(steps):
        mu = np.maximum(b[det.shell] * det.polarization, 1e-12)
        log_pmf = cap * np.log(mu) - mu - special.gammaln(cap + 1.0)
        hazard = np.exp(log_pmf) / np.maximum(special.pdtr(cap, mu), 1e-300)  # p(c) / P(K <= c)
        den = np.bincount(det.shell, weights=np.where(keep, det.polarization * (1 - hazard), 0.0),
                          minlength=n_shells)
        new = np.divide(num, den, out=np.zeros(n_shells), where=den > 0)
        if np.allclose(new, b, rtol=1e-4, atol=1e-9):
            return new
        b = new
    return b


def frame_background(counts: np.ndarray, dead: np.ndarray, tables: RadialTables, iterations: int = 5,
                     quantile: float = 0.99999, clip_quantile: float | None = 0.97,
                     neighbour_quantile: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radial background and outlier pixels of one frame.

    Args:
      counts: (n_pix,) counts on the detector's valid pixels (any integer/float dtype).
      dead: (n_pix,) bool, pixels invalid in this frame (ignored).
      tables: the detector's tables.
      iterations: rejection passes.
      quantile: Poisson CDF level of the outlier threshold.
      clip_quantile: Poisson CDF level above which pixels are left out of the background estimate (the
        truncated-Poisson rate of the rest is the estimate); None: the plain mean (the reference).
      neighbour_quantile: Poisson CDF level above which the photons on a pixel's 8 neighbours leave it out
        of the estimate; None: no neighbour test (the reference).

    Returns:
      ``(background, outlier)``: (n_shells,) float64 photons per pixel per unit pol (0 in shells without
      kept pixels), and (n_pix,) bool outlier pixels (counts above the final threshold, not dead).
    """
    det = tables.detector
    n_shells = det.geometry.n_shells
    k = np.asarray(counts, np.float64)
    keep = ~dead
    outlier = np.zeros(k.shape, bool)
    if neighbour_quantile is not None:
        neighbour_photons = _neighbour_sum(np.where(dead, 0.0, k), tables)
    num = np.bincount(det.shell, weights=np.where(keep, k, 0.0), minlength=n_shells)
    den = np.bincount(det.shell, weights=np.where(keep, det.polarization, 0.0), minlength=n_shells)
    background = np.divide(num, den, out=np.zeros(n_shells), where=den > 0)
    for _ in range(iterations):
        lam = background[det.shell] * det.polarization
        outlier = (k > poisson_threshold(lam, quantile)) & ~dead
        keep = ~dead & ~_dilate(outlier, tables)
        if neighbour_quantile is not None:
            # a pixel counts only when its neighbours' photons are plausible background: independent of
            # its own count for Poisson background, so nothing is biased; drops the photons of weak spots
            # spread over adjacent pixels (none an outlier)
            neighbour_mean = _neighbour_sum(np.where(dead, 0.0, lam), tables)
            keep &= neighbour_photons <= poisson_threshold(neighbour_mean, neighbour_quantile)
        if clip_quantile is None:
            num = np.bincount(det.shell, weights=np.where(keep, k, 0.0), minlength=n_shells)
            den = np.bincount(det.shell, weights=np.where(keep, det.polarization, 0.0), minlength=n_shells)
            new = np.divide(num, den, out=np.zeros(n_shells), where=den > 0)
        else:
            cap = np.maximum(poisson_threshold(lam, clip_quantile), 1).astype(np.float64)
            new = _truncated_rate(k, cap, keep & (k <= cap), tables, background)
        converged = np.allclose(new, background, rtol=1e-4, atol=1e-9)
        background = new
        if converged:
            break
    outlier = (k > poisson_threshold(background[det.shell] * det.polarization, quantile)) & ~dead
    return background, outlier


def _significant(value: float, level: float, pol: float, sigma: float) -> bool:
    """Photons value * pol exceed level * pol by more than sigma Poisson standard deviations."""
    expected = level * pol
    return value * pol - expected > sigma * np.sqrt(max(expected, 1.0))


def ring_shells(background: np.ndarray, shell_pol: np.ndarray, excess: float = 0.05, sigma: float = 5.0,
                min_photons: float = 100.0, first_shell: int = 0) -> np.ndarray:
    """(n_shells,) bool: shells of ice/powder rings (see the module docstring, step 3).

    Args:
      background: (n_shells,) B(s) of one frame (photons per pixel per unit pol).
      shell_pol: (n_shells,) sum of pol over the shell's kept pixels (converts B to photons).
      excess: relative excess of the maximum over the interpolated baseline (0.05: 5 %).
      sigma: required significance of the excess photons, in Poisson standard deviations.
      min_photons: required excess photons of the peak shell over the higher flank (a ring spreads
        hundreds of photons around the beam; on sparse frames the Bragg photons of one shell make
        significant but small bumps, which must not exclude the shell).
      first_shell: shells below this (inside the beam stop) are not considered.
    """
    n = background.shape[0]
    ring = np.zeros(n, bool)
    used = np.flatnonzero(shell_pol > 0)
    used = used[used >= first_shell]
    if used.size < 5:
        return ring
    b = background[used]
    pol = shell_pol[used]
    for j in range(2, b.size - 2):
        window = np.concatenate([b[j - 2:j], b[j + 1:j + 3]])
        if not np.all(b[j] > window):
            continue
        lo = j
        while lo > 0 and b[lo - 1] < b[lo]:
            lo -= 1
        hi = j
        while hi < b.size - 1 and b[hi + 1] < b[hi]:
            hi += 1
        if lo == j or hi == j:
            continue
        base = b[lo] + (b[hi] - b[lo]) * (j - lo) / (hi - lo)
        # significance against the higher flank, so that a noise dip on one side makes no ring
        level = max(b[lo], b[hi])
        if not (b[j] > (1 + excess) * base and _significant(b[j], level, pol[j], sigma)
                and (b[j] - level) * pol[j] >= min_photons):
            continue
        # the ring: the contiguous shells around j still significantly (2 sigma) above the flank level,
        # plus one shell on each side for the tails
        a = j
        while a > lo and _significant(b[a - 1], level, pol[a - 1], 2.0):
            a -= 1
        z = j
        while z < hi and _significant(b[z + 1], level, pol[z + 1], 2.0):
            z += 1
        ring[used[max(a - 1, lo):min(z + 1, hi) + 1]] = True
    return ring
