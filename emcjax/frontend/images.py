"""Dense detector images: readers (CBF via fabio, HDF5/NeXus stacks via h5py + hdf5plugin) and writers.

Images are ``(num_rows, num_cols)`` arrays, row = slow index = lab x, col = fast index = lab y (the
convention of emcjax.detector), counts in photons (int32); negative values mark module gaps or bad
pixels, as detectors write them.

Readers stream: :meth:`ImageStack.frames` yields one frame at a time and keeps only that frame in memory.
Header values (wavelength in Å, distance in m, beam centre in pixels (row, col), pixel size in m, the
saturation level in counts) are parsed where present:

* CBF (Pilatus mini-CBF header, ``_array_data.header_contents``): ``# Wavelength 1.0 A``,
  ``# Detector_distance 0.45 m``, ``# Beam_xy (x, y) pixels`` (x = fast = col), ``# Pixel_size p m x p m``,
  ``# Count_cutoff N counts``.
* HDF5/NeXus: ``/entry/instrument/beam/incident_wavelength`` (Å), ``.../detector/detector_distance`` (m),
  ``.../detector/beam_center_x`` / ``beam_center_y`` (pixels, x = fast = col), ``.../detector/x_pixel_size``
  (m), ``.../detector/saturation_value`` (counts).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import pathlib
import re
from typing import Iterator, Sequence

import h5py
import numpy as np

from emcjax.detector import DetectorGeometry
from emcjax.errors import ConfigError, DataError

H5_DATA_PATH = "/entry/data/data"
H5_REOPEN_FRAMES = 1024  # frames read from an HDF5 stack per opening of the file (bounds its caches)
_NX_DETECTOR = "/entry/instrument/detector"
_NX_WAVELENGTH = "/entry/instrument/beam/incident_wavelength"


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """Geometry values found in an image header (None where absent)."""

    wavelength_A: float | None = None
    distance_m: float | None = None
    beam_center_px: tuple[float, float] | None = None
    """(row, col) in pixels."""
    pixel_size_m: float | None = None
    saturation: float | None = None
    """Counts at or above which a pixel is saturated."""


def _cbf_header(text: str) -> ImageHeader:
    def number(pattern: str) -> float | None:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None

    beam = re.search(r"Beam_xy\s*\(\s*([-\d.eE+]+)\s*,\s*([-\d.eE+]+)\s*\)", text)
    return ImageHeader(
        wavelength_A=number(r"Wavelength\s+([-\d.eE+]+)\s*A"),
        distance_m=number(r"Detector_distance\s+([-\d.eE+]+)\s*m"),
        beam_center_px=(float(beam.group(2)), float(beam.group(1))) if beam else None,
        pixel_size_m=number(r"Pixel_size\s+([-\d.eE+]+)\s*m"),
        saturation=number(r"Count_cutoff\s+([-\d.eE+]+)"),
    )


def cbf_header_text(geometry: DetectorGeometry, saturation: float | None = None) -> str:
    """Pilatus-style mini-CBF header contents for ``geometry`` (what :func:`write_cbf` stores)."""
    row, col = geometry.beam_center_px
    lines = [f"# Wavelength {geometry.wavelength_A:.6f} A", f"# Detector_distance {geometry.distance_m:.6f} m",
             f"# Beam_xy ({col:.3f}, {row:.3f}) pixels",
             f"# Pixel_size {geometry.pixel_size_m:.6e} m x {geometry.pixel_size_m:.6e} m"]
    if saturation is not None:
        lines.append(f"# Count_cutoff {int(saturation)} counts")
    return "\r\n".join(lines)


def write_cbf(path: str | pathlib.Path, image: np.ndarray, header_text: str = "") -> None:
    """Writes one int32 image as a byte-offset compressed CBF (fabio) with a mini-CBF header."""
    import fabio.cbfimage

    header = {"_array_data.header_contents": header_text} if header_text else {}
    fabio.cbfimage.CbfImage(data=np.asarray(image, np.int32), header=header).write(str(path))


def write_h5_stack(path: str | pathlib.Path, frames: Iterator[np.ndarray], n_frames: int, shape: tuple[int, int],
                   geometry: DetectorGeometry | None = None, saturation: float | None = None) -> None:
    """Writes frames as a NeXus-like int32 stack at ``/entry/data/data``, bitshuffle + LZ4 compressed
    (hdf5plugin, as Eiger/Jungfrau files), one chunk per frame, streamed (one frame in memory)."""
    import hdf5plugin

    with h5py.File(path, "w") as f:
        data = f.create_dataset(H5_DATA_PATH, shape=(n_frames, *shape), dtype=np.int32, chunks=(1, *shape),
                                **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        for i, image in enumerate(frames):
            data[i] = image
        if geometry is not None:
            f[_NX_WAVELENGTH] = geometry.wavelength_A
            det = f.require_group(_NX_DETECTOR)
            det["detector_distance"] = geometry.distance_m
            det["beam_center_y"], det["beam_center_x"] = geometry.beam_center_px
            det["x_pixel_size"] = det["y_pixel_size"] = geometry.pixel_size_m
            if saturation is not None:
                det["saturation_value"] = int(saturation)


class ImageStack:
    """A sequence of detector images from CBF files or an HDF5 stack, read one frame at a time.

    Args:
      paths: CBF files, glob patterns of CBF files (sorted), or HDF5 files (their stacks are
        concatenated in the order given).
      h5_path: dataset of the stack inside HDF5 files, shape (n_frames, num_rows, num_cols).
    """

    def __init__(self, paths: Sequence[str | pathlib.Path], h5_path: str = H5_DATA_PATH):
        files: list[pathlib.Path] = []
        for p in paths:
            matches = sorted(glob.glob(str(p))) if any(c in str(p) for c in "*?[") else [str(p)]
            if not matches:
                raise DataError(f"{p}: no file matches this pattern")
            files.extend(pathlib.Path(m) for m in matches)
        if not files:
            raise DataError("images: no input file given; expected CBF files or HDF5 stacks")
        for f in files:
            if not f.is_file():
                raise DataError(f"{f}: no such file")
        self.h5_path = h5_path
        self.files = files
        self.kind = "h5" if all(_is_hdf5(f) for f in files) else "cbf"
        if self.kind == "cbf" and any(_is_hdf5(f) for f in files):
            raise DataError(f"{files[0]}: mixed CBF and HDF5 inputs; expected one kind")
        if self.kind == "h5":
            self._counts = [self._h5_shape(f)[0] for f in files]
            self.shape = self._h5_shape(files[0])[1:]
            for f in files[1:]:
                if self._h5_shape(f)[1:] != self.shape:
                    raise DataError(f"{f}: {h5_path} has frames of shape {self._h5_shape(f)[1:]}, expected "
                                    f"{self.shape} as in {files[0]}")
        else:
            self._counts = [1] * len(files)
            self.shape = self._read_cbf(files[0])[0].shape
        self.n_frames = int(sum(self._counts))

    def _h5_shape(self, path: pathlib.Path) -> tuple[int, ...]:
        import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters)

        try:
            with h5py.File(path, "r") as f:
                if self.h5_path not in f or not isinstance(f[self.h5_path], h5py.Dataset):
                    raise DataError(f"{path}: dataset {self.h5_path} is missing; expected the image stack there "
                                    "(set --h5-path)")
                shape = f[self.h5_path].shape
        except OSError as err:
            raise DataError(f"{path}: not a readable HDF5 file ({err})") from err
        if len(shape) != 3:
            raise DataError(f"{path}: {self.h5_path} has shape {shape}, expected (n_frames, num_rows, num_cols)")
        return shape

    @staticmethod
    def _read_cbf(path: pathlib.Path) -> tuple[np.ndarray, ImageHeader]:
        import fabio

        try:
            img = fabio.open(str(path))
            data = np.asarray(img.data)
        except Exception as err:  # fabio raises many kinds
            raise DataError(f"{path}: not a readable CBF image ({type(err).__name__}: {err})") from err
        if data.ndim != 2 or data.dtype.kind not in "iuf":
            raise DataError(f"{path}: image of shape {data.shape} dtype {data.dtype}, expected a 2-D numeric image")
        return data, _cbf_header(str(img.header.get("_array_data.header_contents", "")))

    def header(self) -> ImageHeader:
        """Geometry values in the header of the first file."""
        if self.kind == "cbf":
            return self._read_cbf(self.files[0])[1]
        with h5py.File(self.files[0], "r") as f:
            def value(name: str) -> float | None:
                return float(np.asarray(f[name][()]).ravel()[0]) if name in f else None

            x, y = value(f"{_NX_DETECTOR}/beam_center_x"), value(f"{_NX_DETECTOR}/beam_center_y")
            return ImageHeader(
                wavelength_A=value(_NX_WAVELENGTH), distance_m=value(f"{_NX_DETECTOR}/detector_distance"),
                beam_center_px=(y, x) if x is not None and y is not None else None,
                pixel_size_m=value(f"{_NX_DETECTOR}/x_pixel_size"),
                saturation=value(f"{_NX_DETECTOR}/saturation_value"))

    def frames(self, start: int = 0, stop: int | None = None, check: DetectorGeometry | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(index, image)`` for frames [start, stop), one at a time, in the file's dtype. With
        ``check``, every CBF header is checked against that geometry (check_header)."""
        import hdf5plugin  # noqa: F401

        stop = self.n_frames if stop is None else stop
        first = 0
        for path, count in zip(self.files, self._counts):
            lo, hi = max(start, first), min(stop, first + count)
            if lo < hi:
                if self.kind == "cbf":
                    image, header = self._read_cbf(path)
                    if check is not None:
                        check_header(check, header, path)
                    if image.shape != self.shape:
                        raise DataError(f"{path}: image of shape {image.shape}, expected {self.shape}")
                    yield first, image
                else:
                    # reopened every H5_REOPEN_FRAMES frames: an open file keeps the chunk-index nodes it has
                    # read in HDF5's metadata cache (~0.4 KB per frame read, up to tens of MiB)
                    for block in range(lo - first, hi - first, H5_REOPEN_FRAMES):
                        with h5py.File(path, "r") as f:
                            data = f[self.h5_path]
                            for i in range(block, min(block + H5_REOPEN_FRAMES, hi - first)):
                                yield first + i, data[i]
            first += count


def _is_hdf5(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def check_header(geometry: DetectorGeometry, header: ImageHeader, where: object, rtol: float = 1e-3,
                 beam_tol_px: float = 1.0) -> None:
    """Raises ConfigError naming ``where`` and the field when a header value disagrees with ``geometry``
    (relative tolerance ``rtol``; beam centre within ``beam_tol_px`` pixels)."""
    for name in ("wavelength_A", "distance_m", "pixel_size_m"):
        value = getattr(header, name)
        expected = getattr(geometry, name)
        if value is not None and not math.isclose(value, expected, rel_tol=rtol):
            raise ConfigError(f"{where}: header {name} = {value:g} disagrees with the geometry's {expected:g}")
    if header.beam_center_px is not None:
        d = np.subtract(header.beam_center_px, geometry.beam_center_px)
        if np.hypot(*d) > beam_tol_px:
            raise ConfigError(f"{where}: header beam centre (row, col) = {header.beam_center_px} disagrees with "
                              f"the geometry's {geometry.beam_center_px} by more than {beam_tol_px} pixels")


def geometry_with_header(geometry: DetectorGeometry, header: ImageHeader, shape: tuple[int, int]) -> DetectorGeometry:
    """``geometry`` with the header's values (where present) and the image shape."""
    values = {k: v for k, v in dataclasses.asdict(header).items() if v is not None and k != "saturation"}
    return dataclasses.replace(geometry, num_rows=int(shape[0]), num_cols=int(shape[1]), **values)


def geometry_from_poni(path: str | pathlib.Path, base: DetectorGeometry) -> DetectorGeometry:
    """Detector geometry from a pyFAI PONI file (distance, PONI, rotations, pixel size, wavelength).

    emcjax's frame is the detector's own: x along rows, y along columns, z = x × y, the detector plane at
    z = -distance; a rotated detector (pyFAI rot1, rot2, rot3) is the same plane hit by a tilted beam. From
    pyFAI's lab positions of three pixel centres (``calc_pos_zyx``; pixel i has its centre at
    (i + 0.5) x pixel from the corner): the detector axes e_row, e_col, m = e_row × e_col in the lab; the
    beam (lab z) in the detector frame, beam_direction = (e_row·z, e_col·z, m·z); distance_m = -m·P_00 (the
    plane's distance from the sample, pyFAI's dist); beam_center_px = where the beam line meets the plane,
    in pixels from pixel (0, 0). Per-pixel q then equals pyFAI's (tests/test_frontend_reduce.py). The
    polarization factor stays emcjax's (polarization along the column axis), an approximation of the order
    of the tilt.
    """
    import pyFAI

    try:
        geo = pyFAI.load(str(path))
    except Exception as err:
        raise ConfigError(f"{path}: not a readable PONI file ({type(err).__name__}: {err})") from err
    if not math.isclose(geo.pixel1, geo.pixel2, rel_tol=1e-6):
        raise ConfigError(f"{path}: pixel1 = {geo.pixel1}, pixel2 = {geo.pixel2}; expected square pixels")
    z, y, x = geo.calc_pos_zyx(d1=np.array([0.0, 1.0, 0.0]), d2=np.array([0.0, 0.0, 1.0]))
    pos = np.stack([x, y, z], axis=1)  # lab (x, y, z = beam) in m of pixels (0, 0), (1, 0), (0, 1)
    e_row = (pos[1] - pos[0]) / np.linalg.norm(pos[1] - pos[0])
    e_col = (pos[2] - pos[0]) / np.linalg.norm(pos[2] - pos[0])
    normal = np.cross(e_row, e_col)
    beam = np.array([e_row[2], e_col[2], normal[2]])  # lab z in the detector frame
    distance = -float(normal @ pos[0])
    if not (beam[2] < -1e-6 and distance > 0):
        raise ConfigError(f"{path}: rot1, rot2, rot3 = {geo.rot1}, {geo.rot2}, {geo.rot3} turn the detector away "
                          "from the sample or parallel to the beam; expected a detector facing the beam")
    hit = np.array([0.0, 0.0, 1.0]) * (-distance / beam[2])  # where the beam line meets the plane (lab)
    values = dict(distance_m=distance, pixel_size_m=geo.pixel1, beam_direction=tuple(float(v) for v in beam),
                  beam_center_px=(float((hit - pos[0]) @ e_row / geo.pixel1),
                                  float((hit - pos[0]) @ e_col / geo.pixel2)))
    if geo.wavelength:
        values["wavelength_A"] = geo.wavelength * 1e10
    if geo.detector is not None and geo.detector.max_shape is not None:
        values["num_rows"], values["num_cols"] = (int(x) for x in geo.detector.max_shape)
    return dataclasses.replace(base, **values)
