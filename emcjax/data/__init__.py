"""The sparse data set: one HDF5 file of photon lists (docs/FORMATS.md).

* :class:`SparseFrames` (``frames.py``) -- a block of frames in memory, CSR form (numpy).
* :func:`write_dataset` (``writer.py``) -- writes a whole data set atomically (temporary file + rename).
* :class:`SparseDataset` (``reader.py``) -- reader; validates the layout at open, reads frames in blocks.
* :func:`pad_frames` / :func:`bucket_length` (``padding.py``) -- static-shape padded arrays for the JAX kernels.
* ``layout.py`` -- the format name and version, HDF5 attributes and the ``/truth`` group.

This package is pure I/O + numpy: the detector geometry and the crystal are passed and returned as plain
dicts of attributes (``dataclasses.asdict(geometry)``), so it does not depend on ``emcjax.detector`` or
``emcjax.crystal``. The names below are its public API (``from emcjax.data import SparseDataset``).
"""

from emcjax.data.frames import SparseFrames, rotation_count
from emcjax.data.layout import FORMAT_NAME, FORMAT_VERSION
from emcjax.data.padding import PaddedFrames, bucket_length, pad_frames
from emcjax.data.reader import SparseDataset
from emcjax.data.writer import write_dataset

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PaddedFrames", "SparseDataset", "SparseFrames", "bucket_length",
           "pad_frames", "rotation_count", "write_dataset"]
