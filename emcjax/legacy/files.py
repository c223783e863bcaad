"""Readers and writers of the files in an EMC-for-SMX working directory (METHOD.md §13).

Each reader checks the size/shape its header or config implies and raises ``DataError`` naming the file and
what was expected.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np

from emcjax import data as data_io
from emcjax import atomic_files
from emcjax.errors import DataError

# Fixed locations inside a reference working directory (METHOD.md §2).
REC_VECTORS = "make-detector/rec-vectors.bin"
PIX_MAP_DAT = "make-detector/pix-map.dat"
PIX_MAP_BIN = "make-detector/pix-map.bin"
BASIS_VEC = "aux/basis-vec.dat"
SYM_OP = "aux/sym-op.dat"


# ---------------------------------------------------------------------------------------------------------
# config.ini
# ---------------------------------------------------------------------------------------------------------


def read_config_ini(path: str | pathlib.Path) -> dict[str, str]:
    """Keys of a reference config.ini, parsed like the C programs (METHOD.md §1).

    Each line is split at spaces and '=' (``strtok(line, " =")``); the first token is the key, the second
    its value; section headers and lines with fewer than two tokens are ignored; a later line overrides an
    earlier one with the same key (sections do not scope keys).
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected the reference's config.ini)") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        tokens = [t for t in re.split(r"[ =\t\r\n]+", line) if t]
        if len(tokens) < 2 or tokens[0].startswith(("[", "#", ";")):
            continue
        out[tokens[0]] = tokens[1]
    return out


def required_key(cfg: dict, key: str, where: pathlib.Path, kind: type = str, what: str = "") -> Any:
    """``kind(cfg[key])``; DataError naming ``where`` and the key (``what`` expected) when it is missing or
    not of that kind."""
    if key not in cfg:
        raise DataError(f"{where}: key '{key}' is missing; expected {what or kind.__name__}")
    try:
        return kind(cfg[key])
    except ValueError:
        raise DataError(f"{where}: key '{key}' = {cfg[key]!r}; expected {what or kind.__name__}") from None


# ---------------------------------------------------------------------------------------------------------
# Binary/text readers (each names its file and what it expected)
# ---------------------------------------------------------------------------------------------------------


def _read_bytes(path: pathlib.Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected {what})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory (expected {what})") from None


def _read_text(path: pathlib.Path, what: str) -> list[str]:
    return _read_bytes(path, what).decode("utf-8", errors="replace").split()


def _floats(path: pathlib.Path, tokens: list[str], what: str) -> np.ndarray:
    try:
        return np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError as err:
        raise DataError(f"{path}: {err}; expected {what}") from None


def _ints(path: pathlib.Path, tokens: list[str], what: str) -> np.ndarray:
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError as err:
        raise DataError(f"{path}: {err}; expected {what}") from None


def read_rec_vectors(path: pathlib.Path) -> tuple[int, int, np.ndarray, np.ndarray]:
    """``rec-vectors.bin``: (q_max_px, q_min_px, q_px (n, 3) float64 pixel units, pol (n,) float64)."""
    what = "int32 qmax_px, int32 qmin_px, int32 Npix, then Npix x float64 (qx, qy, qz, pol)"
    raw = _read_bytes(path, what)
    if len(raw) < 12:
        raise DataError(f"{path}: {len(raw)} bytes; expected at least a 12-byte header ({what})")
    qmax_px, qmin_px, n = (int(x) for x in np.frombuffer(raw[:12], "<i4"))
    if n < 0 or len(raw) != 12 + 32 * n:
        raise DataError(f"{path}: {len(raw)} bytes with Npix = {n} in the header; expected {12 + 32 * max(n, 0)} "
                        f"bytes ({what})")
    rec = np.frombuffer(raw[12:], "<f8").reshape(n, 4)
    return qmax_px, qmin_px, rec[:, :3].copy(), rec[:, 3].copy()


def read_pix_map(directory: pathlib.Path, total_pix: int, n_valid: int) -> tuple[np.ndarray, pathlib.Path]:
    """``pix-map.dat`` (text) or ``pix-map.bin`` (int32): valid-pixel index of every raw pixel or -1."""
    what = (f"{total_pix} entries (num_row x num_col), each the index of the raw pixel in rec-vectors.bin "
            f"(0..{n_valid - 1}) or -1")
    dat, binf = directory / PIX_MAP_DAT, directory / PIX_MAP_BIN
    if dat.exists():
        path, pix_map = dat, _ints(dat, _read_text(dat, what), what)
    elif binf.exists():
        raw = _read_bytes(binf, what)
        if len(raw) != 4 * total_pix:
            raise DataError(f"{binf}: {len(raw)} bytes; expected {4 * total_pix} (int32 x {what})")
        path, pix_map = binf, np.frombuffer(raw, "<i4").astype(np.int64)
    else:
        raise DataError(f"{dat}: no such file (nor {binf}); expected {what}")
    if pix_map.shape != (total_pix,):
        raise DataError(f"{path}: {pix_map.shape[0]} entries; expected {what}")
    valid = pix_map >= 0
    if np.any(pix_map < -1) or np.any(pix_map >= n_valid) or valid.sum() != n_valid \
            or not np.array_equal(np.sort(pix_map[valid]), np.arange(n_valid)):
        raise DataError(f"{path}: entries are not a permutation of 0..{n_valid - 1} plus -1; expected {what}")
    return pix_map, path


def read_matrix_file(path: pathlib.Path, count: int | None, what: str) -> np.ndarray:
    """``basis-vec.dat`` (count None: 9 numbers) or ``sym-op.dat`` (a count, then count x 9 numbers)."""
    tokens = _read_text(path, what)
    if count is None:
        vals = _floats(path, tokens, what)
        if vals.shape != (9,):
            raise DataError(f"{path}: {vals.shape[0]} numbers; expected {what}")
        return vals.reshape(3, 3)
    if not tokens:
        raise DataError(f"{path}: empty; expected {what}")
    n = _ints(path, tokens[:1], what)[0]
    vals = _floats(path, tokens[1:], what)
    if n < 1 or vals.shape != (9 * n,):
        raise DataError(f"{path}: count {n} and {vals.shape[0]} numbers; expected {what} (count x 9 numbers)")
    return vals.reshape(n, 3, 3)


def sampling_n_of_count(n_rot: int) -> int | None:
    """The 600-cell parameter n with 10(5n^3 + n) == n_rot (METHOD.md §9.1), or None if there is none."""
    n = max(int(round((n_rot / 50.0) ** (1.0 / 3.0))), 1)
    for m in (n - 1, n, n + 1):
        if m >= 1 and data_io.rotation_count(m) == n_rot:
            return m
    return None


def read_quaternion_file(path: pathlib.Path) -> tuple[int | None, np.ndarray]:
    """A quaternion file (``c-quaternion<n>.bin`` or any name): (n, (N, 5) float64 rows q0, q1, q2, q3, w).

    n comes from the row count N = 10(5n^3 + n) (None when N is no 600-cell count: an arbitrary rotation
    list with its weights); a name ending in ``quaternion<m>.bin`` is only a cross-check (m must equal n).
    """
    what = "int32 N, then N x float64 (q0, q1, q2, q3, w)"
    raw = _read_bytes(path, what)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes; expected {what}")
    count = int(np.frombuffer(raw[:4], "<i4")[0])
    if count < 1 or len(raw) != 4 + 40 * count:
        raise DataError(f"{path}: header N = {count}, {len(raw)} bytes; expected {what} ({4 + 40 * max(count, 0)} bytes)")
    n = sampling_n_of_count(count)
    m = re.search(r"quaternion(\d+)\.bin$", path.name)
    if m is not None and n != int(m.group(1)):
        raise DataError(f"{path}: {count} rows; the name says n = {m.group(1)}, which has "
                        f"{data_io.rotation_count(int(m.group(1)))} rows (10(5n^3+n)); expected the row count of the name")
    return n, np.frombuffer(raw[4:], "<f8").reshape(count, 5).copy()


def read_prob_orien(path: pathlib.Path, n_frames: int, n_rot: int) -> tuple[np.ndarray, np.ndarray]:
    """``prob-orien.bin``: per frame int32 count + int32 ids -> (offsets (N+1,), rotations) int64."""
    what = f"{n_frames} records of int32 count then count int32 rotation ids in [0, {n_rot})"
    raw_bytes = _read_bytes(path, what)
    if len(raw_bytes) % 4 != 0:
        raise DataError(f"{path}: {len(raw_bytes)} bytes is not a multiple of 4; expected {what}")
    raw = np.frombuffer(raw_bytes, "<i4")
    offsets = np.zeros(n_frames + 1, np.int64)
    pos = 0
    for d in range(n_frames):
        if pos >= raw.shape[0]:
            raise DataError(f"{path}: ends after {d} frame records; expected {what}")
        c = int(raw[pos])
        if c < 0 or pos + 1 + c > raw.shape[0]:
            raise DataError(f"{path}: frame {d} has count {c} at int32 {pos} beyond the file end; expected {what}")
        offsets[d + 1] = offsets[d] + c
        pos += 1 + c
    if pos != raw.shape[0]:
        raise DataError(f"{path}: {raw.shape[0] - pos} int32 values left after {n_frames} frame records; "
                        f"expected {what}")
    keep = np.ones(raw.shape[0], bool)
    keep[(offsets[:-1] + np.arange(n_frames)).astype(np.int64)] = False  # the count words
    ids = raw[keep].astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_rot):
        raise DataError(f"{path}: rotation id {int(ids.min()) if ids.min() < 0 else int(ids.max())} out of "
                        f"range; expected {what}")
    return offsets, ids


def read_data_ids(path: pathlib.Path) -> np.ndarray:
    """``reduced-data_id.dat``: N, then N raw frame indices."""
    what = "text: N, then N raw frame indices"
    vals = _ints(path, _read_text(path, what), what)
    if vals.size == 0 or vals[0] < 0 or vals.shape[0] != vals[0] + 1:
        raise DataError(f"{path}: {vals.size} numbers with N = {vals[0] if vals.size else None}; expected {what}")
    return vals[1:]


def read_phi(path: pathlib.Path, n_frames: int) -> np.ndarray:
    what = f"text, one float per reduced frame ({n_frames} values)"
    vals = _floats(path, _read_text(path, what), what)
    if vals.shape != (n_frames,):
        raise DataError(f"{path}: {vals.shape[0]} values; expected {what}")
    return vals


def read_float64_array(path: pathlib.Path, shape: tuple[int, ...], what: str) -> np.ndarray:
    raw = _read_bytes(path, what)
    size = int(np.prod(shape)) * 8
    if len(raw) != size:
        raise DataError(f"{path}: {len(raw)} bytes; expected {size} bytes ({what})")
    return np.frombuffer(raw, "<f8").reshape(shape).copy()


def read_datafile(path: pathlib.Path, n_frames: int, n_pix: int) -> np.ndarray:
    what = f"int16[{n_frames}][{n_pix}] (frames x full_num_pix valid pixels, -1 = invalid)"
    size = n_frames * n_pix * 2
    if not path.exists():
        raise DataError(f"{path}: no such file (expected {what})")
    if path.stat().st_size != size:
        raise DataError(f"{path}: {path.stat().st_size} bytes; expected {size} bytes ({what})")
    return np.memmap(path, dtype="<i2", mode="r", shape=(n_frames, n_pix))



def write_file(path: pathlib.Path, data: bytes | str) -> None:
    """Writes ``data`` (bytes, or text as UTF-8) to ``path`` atomically, making its parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_files.atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)

