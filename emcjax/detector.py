"""Flat-detector geometry: per-pixel scattering vectors, polarization and radial shells.

This is the detector model of the reference program (METHOD.md §3, ``make-detector.c``) written in
physical units and vectorised over all pixels with numpy (one-time set-up, float64).

Lab frame (ARCHITECTURE.md, METHOD.md §1):

* x runs along detector rows (the slow pixel index ``row``), y along columns (the fast index ``col``),
  z along the detector normal, pointing from the detector to the sample. The detector is the plane
  z = -distance, perpendicular to z.
* The beam travels along ``beam_direction`` (unnormalised, default (0, 0, -1), i.e. along -z); it
  may be tilted, but must have a negative z component.
* Raw pixel id ``pid = row * num_cols + col``.

Model, in pixel units (p = pixel size):

1. ``D = (distance_m / p) * |s| / |s_z|`` is the sample-to-beam-centre distance along the beam, and
   ``b = D * s / |s|`` the vector from the sample to the point where the beam hits the detector, so
   ``b_z = -distance_m / p``.
2. Pixel centre (row, col): ``S = (b_x + row - c_row, b_y + col - c_col, b_z)``.
3. Scattering vector ``q = (S/|S| - b/|b|) / λ`` in 1/Å, no 2π, so |q| = 2 sin(θ)/λ = 1/d, with 2θ
   the angle between S and b.
4. Intensity factor ``pol = (1 - (S_y/|S|)^2) * |S_z| / |S|^3``: polarization along y times the pixel
   solid angle (no Lorentz, absorption or parallax terms), normalised so that its maximum over the
   kept pixels is 1.
5. Kept ("valid") pixels: not masked and ``q_min <= |q| <= q_max`` with ``q_max = 1/resolution_max_A``
   and ``q_min = 2 sin(atan(R/D)/2) / λ`` (R = beamstop radius in pixels). Unlike the reference, the
   limits are not rounded up to whole pixel units.
6. Valid pixels are sorted by ascending |q| (stable sort, ties keep raw pixel order), so a resolution
   cutoff is a prefix of the list (``Detector.truncate``).

Radial background shells split [0, q_max] into ``n_shells`` shells of width ``q_max / n_shells``;
pixel shell = ``floor(|q| / shell_width)``, clipped to ``n_shells - 1`` (only |q| = q_max exactly
reaches the upper edge).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import numpy as np

from emcjax.errors import ConfigError

__all__ = ["DetectorGeometry", "Detector", "make_detector"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"DetectorGeometry.{name} = {value!r}: expected an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(f"DetectorGeometry.{name} = {value!r}: expected an integer >= {minimum}")
    return int(value)


def _check_float(name: str, value: object, *, positive: bool = False,
                 nonnegative: bool = False) -> float:
    if positive:
        allowed = "a finite number > 0"
    elif nonnegative:
        allowed = "a finite number >= 0"
    else:
        allowed = "a finite number"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigError(f"DetectorGeometry.{name} = {value!r}: expected {allowed}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0.0) or (nonnegative and v < 0.0):
        raise ConfigError(f"DetectorGeometry.{name} = {value!r}: expected {allowed}")
    return v


def _check_vector(name: str, value: object, length: int) -> tuple[float, ...]:
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        items = None
    if items is None or len(items) != length:
        raise ConfigError(
            f"DetectorGeometry.{name} = {value!r}: expected a sequence of {length} finite numbers")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Real) \
                or not math.isfinite(float(item)):
            raise ConfigError(f"DetectorGeometry.{name} = {value!r}: element {i} is {item!r}, "
                              f"expected a sequence of {length} finite numbers")
        out.append(float(item))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class DetectorGeometry:
    """Flat detector perpendicular to the lab z axis, and the X-ray beam.

    All fields are validated on construction; an invalid value raises ``ConfigError`` naming the
    field, the value and the allowed range. Sequence fields are stored as tuples of floats.

    Attributes:
        num_rows: Number of pixel rows (slow index, lab x), >= 1.
        num_cols: Number of pixel columns (fast index, lab y), >= 1.
        pixel_size_m: Pixel edge length in metres (square pixels), > 0.
        distance_m: Sample-to-detector-plane distance along the detector normal (z), metres, > 0.
        beam_center_px: (row, col) in pixels where the beam hits the detector plane; pixel (r, c) has
            its centre at (r, c). Any finite values (may lie off the detector).
        beam_direction: (s_x, s_y, s_z) direction of travel of the beam, unnormalised, like
            sx, sy, sz of the reference; s_z must be < 0 (beam travels towards the detector, -z).
        wavelength_A: X-ray wavelength λ in Å, > 0.
        beamstop_radius_px: Radius in pixels around the beam centre whose pixels are dropped, >= 0
            (sets the inner limit q_min).
        resolution_max_A: d_min in Å of the outermost kept pixels (q_max = 1/resolution_max_A), > 0.
        n_shells: Number of radial background shells over [0, q_max], >= 1.
    """

    num_rows: int = 256
    num_cols: int = 256
    pixel_size_m: float = 0.9e-3
    distance_m: float = 0.45
    beam_center_px: tuple[float, float] = (127.5, 127.5)
    beam_direction: tuple[float, float, float] = (0.0, 0.0, -1.0)
    wavelength_A: float = 1.0
    beamstop_radius_px: float = 6.0
    resolution_max_A: float = 4.0
    n_shells: int = 100

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("num_rows", _check_int("num_rows", self.num_rows, 1))
        set_("num_cols", _check_int("num_cols", self.num_cols, 1))
        set_("pixel_size_m", _check_float("pixel_size_m", self.pixel_size_m, positive=True))
        set_("distance_m", _check_float("distance_m", self.distance_m, positive=True))
        set_("beam_center_px", _check_vector("beam_center_px", self.beam_center_px, 2))
        direction = _check_vector("beam_direction", self.beam_direction, 3)
        if not direction[2] < 0.0:
            raise ConfigError(
                f"DetectorGeometry.beam_direction = {self.beam_direction!r}: expected a z component "
                "< 0 (the beam travels along -z, towards the detector)")
        set_("beam_direction", direction)
        set_("wavelength_A", _check_float("wavelength_A", self.wavelength_A, positive=True))
        set_("beamstop_radius_px",
             _check_float("beamstop_radius_px", self.beamstop_radius_px, nonnegative=True))
        set_("resolution_max_A",
             _check_float("resolution_max_A", self.resolution_max_A, positive=True))
        set_("n_shells", _check_int("n_shells", self.n_shells, 1))

    @property
    def num_pixels(self) -> int:
        """Total number of raw pixels, num_rows * num_cols."""
        return self.num_rows * self.num_cols

    @property
    def distance_px(self) -> float:
        """D: sample-to-beam-centre distance along the beam, in pixels (METHOD.md §3 step 1)."""
        s = np.asarray(self.beam_direction)
        return self.distance_m / self.pixel_size_m * float(np.linalg.norm(s)) / abs(s[2])

    @property
    def beam_vector_px(self) -> np.ndarray:
        """b = D * s/|s|: (3,) float64, sample -> beam centre on the detector, pixel units."""
        s = np.asarray(self.beam_direction, dtype=np.float64)
        return self.distance_px * s / np.linalg.norm(s)

    @property
    def q_max(self) -> float:
        """Outer limit of kept pixels, 1/resolution_max_A, in 1/Å."""
        return 1.0 / self.resolution_max_A

    @property
    def q_min(self) -> float:
        """Inner (beamstop) limit 2 sin(atan(R/D)/2)/λ in 1/Å."""
        return 2.0 * math.sin(0.5 * math.atan(self.beamstop_radius_px / self.distance_px)) \
            / self.wavelength_A

    @property
    def shell_width(self) -> float:
        """Width of one radial background shell, q_max / n_shells, in 1/Å."""
        return self.q_max / self.n_shells


@dataclasses.dataclass(frozen=True, eq=False)
class Detector:
    """The valid pixels of a detector, sorted by ascending |q|.

    Arrays are made read-only on construction. ``n_pix`` below is the number of valid pixels.

    Attributes:
        q: (n_pix, 3) float64 lab-frame scattering vectors in 1/Å (no 2π), |q| = 2 sin(θ)/λ.
        polarization: (n_pix,) float64 polarization (along y) times solid angle, dimensionless,
            normalised to max 1 over the pixels kept by ``make_detector`` (not renormalised by
            ``truncate``).
        shell: (n_pix,) int32 radial shell index floor(|q| / shell_width), in [0, n_shells).
        pixel_id: (n_pix,) int64 raw pixel id row * num_cols + col.
        geometry: The geometry the pixels were computed from.
    """

    q: np.ndarray
    polarization: np.ndarray
    shell: np.ndarray
    pixel_id: np.ndarray
    geometry: DetectorGeometry

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        q = np.array(self.q, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != 3:
            raise ConfigError(f"Detector.q has shape {q.shape}: expected (n_pix, 3)")
        n = q.shape[0]
        arrays = {
            "q": q,
            "polarization": np.array(self.polarization, dtype=np.float64),
            "shell": np.array(self.shell, dtype=np.int32),
            "pixel_id": np.array(self.pixel_id, dtype=np.int64),
        }
        for name, arr in arrays.items():
            if arr.shape[0:1] != (n,) or (name != "q" and arr.ndim != 1):
                raise ConfigError(f"Detector.{name} has shape {arr.shape}: expected "
                                  f"({n},) to match q of shape {q.shape}")
            arr.setflags(write=False)
            set_(name, arr)
        if not isinstance(self.geometry, DetectorGeometry):
            raise ConfigError(f"Detector.geometry = {self.geometry!r}: expected a DetectorGeometry")

    @property
    def n_pix(self) -> int:
        """Number of valid pixels."""
        return int(self.q.shape[0])

    @property
    def shell_width(self) -> float:
        """Width of one radial shell in 1/Å (geometry.q_max / geometry.n_shells)."""
        return self.geometry.shell_width

    @functools.cached_property
    def q_norm(self) -> np.ndarray:
        """(n_pix,) float64 |q| in 1/Å, ascending."""
        out = np.linalg.norm(self.q, axis=1)
        out.setflags(write=False)
        return out

    def pixel_map(self) -> np.ndarray:
        """Map from raw pixel id to position in the valid-pixel list.

        Returns:
            (num_rows * num_cols,) int32: index t with ``pixel_id[t] == pid``, or -1 for pixels that
            are masked or outside the resolution limits.
        """
        out = np.full(self.geometry.num_pixels, -1, dtype=np.int32)
        out[self.pixel_id] = np.arange(self.n_pix, dtype=np.int32)
        return out

    def truncate(self, resolution_A: float) -> Detector:
        """Keep only the pixels with |q| <= 1/resolution_A.

        Because the pixels are sorted by |q|, the result is a prefix of this detector. Polarization is
        not renormalised; shells and geometry are unchanged.

        Args:
            resolution_A: Resolution cutoff d in Å, > 0.

        Returns:
            A Detector holding the first n' <= n_pix pixels.
        """
        if isinstance(resolution_A, (bool, np.bool_)) or not isinstance(resolution_A, numbers.Real) \
                or not (math.isfinite(float(resolution_A)) and resolution_A > 0):
            raise ConfigError(f"truncate: resolution_A = {resolution_A!r}: expected a finite "
                              "number > 0 (Å)")
        n = int(np.searchsorted(self.q_norm, 1.0 / float(resolution_A), side="right"))
        return Detector(q=self.q[:n], polarization=self.polarization[:n], shell=self.shell[:n],
                        pixel_id=self.pixel_id[:n], geometry=self.geometry)


def make_detector(geometry: DetectorGeometry, mask: np.ndarray | None = None) -> Detector:
    """Compute the valid pixels of a detector, sorted by ascending |q|.

    Args:
        geometry: Detector and beam parameters.
        mask: Optional (num_rows, num_cols) bool array, True = bad pixel (integer 0/1 arrays are
            accepted too). None means no bad pixels.

    Returns:
        The Detector of unmasked pixels with q_min <= |q| <= q_max (see module docstring).

    Raises:
        ConfigError: If the mask has the wrong shape or non-boolean values, or no pixel is kept.
    """
    g = geometry
    if not isinstance(g, DetectorGeometry):
        raise ConfigError(f"make_detector: geometry = {g!r}: expected a DetectorGeometry")
    shape = (g.num_rows, g.num_cols)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ConfigError(f"make_detector: mask has shape {mask.shape}: expected (num_rows, "
                              f"num_cols) = {shape}")
        if mask.dtype != np.bool_:
            if not (np.issubdtype(mask.dtype, np.integer) and np.all((mask == 0) | (mask == 1))):
                raise ConfigError(f"make_detector: mask has dtype {mask.dtype} with values other "
                                  "than 0/1: expected a bool array (True = bad pixel)")
            mask = mask.astype(bool)

    b = g.beam_vector_px
    b_hat = b / np.linalg.norm(b)
    inv_wl = 1.0 / g.wavelength_A
    # Separable pixel-centre coordinates: S_x depends on the row only, S_y on the column only.
    sx = (b[0] + np.arange(g.num_rows, dtype=np.float64) - g.beam_center_px[0])[:, None]
    sy = (b[1] + np.arange(g.num_cols, dtype=np.float64) - g.beam_center_px[1])[None, :]
    sz = b[2]
    inv_r = 1.0 / np.sqrt(sx * sx + sy * sy + sz * sz)          # (rows, cols) 1/|S|
    qx = (sx * inv_r - b_hat[0]) * inv_wl
    qy = (sy * inv_r - b_hat[1]) * inv_wl
    qz = (sz * inv_r - b_hat[2]) * inv_wl
    q_norm = np.sqrt(qx * qx + qy * qy + qz * qz)

    valid = (q_norm >= g.q_min) & (q_norm <= g.q_max)
    if mask is not None:
        valid &= ~mask
    flat_ids = np.flatnonzero(valid)
    if flat_ids.size == 0:
        raise ConfigError(
            f"make_detector: no valid pixel (q_min = {g.q_min:.6g} 1/Å from beamstop_radius_px = "
            f"{g.beamstop_radius_px}, q_max = {g.q_max:.6g} 1/Å from resolution_max_A = "
            f"{g.resolution_max_A}, mask): expected at least one unmasked pixel within the limits")
    qn_valid = q_norm.ravel()[flat_ids]
    order = np.argsort(qn_valid, kind="stable")
    pixel_id = flat_ids[order].astype(np.int64)
    qn_sorted = qn_valid[order]

    q = np.stack([qx.ravel()[pixel_id], qy.ravel()[pixel_id], qz.ravel()[pixel_id]], axis=1)
    rows, cols = np.divmod(pixel_id, g.num_cols)
    inv_r_t = inv_r[rows, cols]
    pol = (1.0 - (sy[0, cols] * inv_r_t) ** 2) * abs(sz) * inv_r_t ** 3
    pol /= pol.max()
    shell = np.minimum(np.floor(qn_sorted / g.shell_width), g.n_shells - 1).astype(np.int32)
    return Detector(q=q, polarization=pol, shell=shell, pixel_id=pixel_id, geometry=g)
