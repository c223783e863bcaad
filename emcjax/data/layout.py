"""The file's identity (format name and version) and the conversion of HDF5 attributes and of the ``/truth``
group between Python values and what h5py stores (docs/FORMATS.md)."""

from __future__ import annotations

from typing import Any, Mapping

import h5py
import numpy as np

from emcjax.errors import DataError

FORMAT_NAME = "emcjax-sparse"
FORMAT_VERSION = 1


def attr_to_h5(where: str, key: str, value: Any) -> Any:
    """Python value -> something h5py stores as an attribute. Tuples/lists become arrays, None Empty."""
    if value is None:
        return h5py.Empty("f8")
    if isinstance(value, (str, bytes)):
        return value.decode() if isinstance(value, bytes) else value
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, np.integer)):
        return np.int64(value)
    if isinstance(value, (float, np.floating)):
        return np.float64(value)
    if isinstance(value, (tuple, list, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind in "US":
            return arr.astype(h5py.string_dtype())
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{where}: attribute {key!r} has unsupported value {value!r}; expected numbers, "
                            "strings or tuples/arrays of numbers")
        return arr
    raise DataError(f"{where}: attribute {key!r} has unsupported type {type(value).__name__}; expected "
                    "a number, string, None or tuple/array of numbers")


def attr_from_h5(value: Any) -> Any:
    """Inverse of :func:`attr_to_h5`: numpy scalars -> Python scalars, 1-D arrays -> tuples."""
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return attr_from_h5(value[()])
        if value.ndim == 1:
            return tuple(attr_from_h5(v) for v in value)
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_attrs(obj: h5py.HLObject, where: str, attrs: Mapping[str, Any]) -> None:
    for k, v in attrs.items():
        obj.attrs[str(k)] = attr_to_h5(where, k, v)


def read_attrs(obj: h5py.HLObject) -> dict:
    return {k: attr_from_h5(obj.attrs[k]) for k in obj.attrs.keys()}


def write_truth(group: h5py.Group, truth: Mapping[str, Any], where: str) -> None:
    for k, v in truth.items():
        name = str(k)
        if isinstance(v, Mapping):
            write_truth(group.create_group(name), v, f"{where}/{name}")
        elif isinstance(v, np.ndarray) and v.ndim >= 1:
            if v.dtype.kind not in "biufc":
                raise DataError(f"{where}: truth entry {name!r} has unsupported dtype {v.dtype}")
            group.create_dataset(name, data=v)
        else:
            group.attrs[name] = attr_to_h5(where, name, v)


def read_truth(group: h5py.Group) -> dict:
    out: dict = read_attrs(group)
    for k, obj in group.items():
        out[k] = read_truth(obj) if isinstance(obj, h5py.Group) else obj[()]
    return out
