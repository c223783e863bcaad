"""Memory of the reduction is bounded by a block of frames, not the frame count (issue 13, build item 7).

The growth found (docs/BENCHMARKS.md, "Reduction: peak memory independent of the frame count") was HDF5's
metadata cache of the input stack, which keeps every chunk-index node read while the file stays open; the
reader now reopens the stack every ``H5_REOPEN_FRAMES`` frames. These tests measure the retained state
itself (the open file's metadata cache; the Python heap after each committed block), not timings.
"""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np

from emcjax.detector import DetectorGeometry
from emcjax.frontend import images as images_lib
from emcjax.frontend import reduce as reduce_lib
from emcjax.frontend import writer as writer_lib

SIZE = 16
GEOMETRY = DetectorGeometry(num_rows=SIZE, num_cols=SIZE, pixel_size_m=1.4e-2, distance_m=0.45,
                            beam_center_px=(7.7, 8.4), beamstop_radius_px=1.0, resolution_max_A=4.5, n_shells=6)


def _stack(path, n: int) -> None:
    rng = np.random.default_rng(0)

    def frames():
        for _ in range(n):
            image = rng.poisson(0.5, size=(SIZE, SIZE))
            image.ravel()[rng.choice(SIZE * SIZE, 3, replace=False)] += 30
            yield image.astype(np.int32)

    images_lib.write_h5_stack(path, frames(), n, (SIZE, SIZE), GEOMETRY)


def _open_stack_mdc_bytes(path) -> int:
    """Current size (bytes) of the metadata cache of the open HDF5 file ``path``."""
    for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        if fid.name.decode() == str(path):
            return int(fid.get_mdc_size()[2])  # (max, min clean, current size, entries)
    raise AssertionError(f"{path} is not open")


def test_reading_a_stack_keeps_the_hdf5_metadata_cache_bounded(tmp_path):
    block = images_lib.H5_REOPEN_FRAMES
    n = 3 * block
    path = tmp_path / "stack.h5"
    _stack(path, n)
    sizes = {}
    for index, _ in images_lib.ImageStack([path]).frames():
        if index in (block - 1, n - 1):  # the last frame of the first and of the third opening
            sizes[index] = _open_stack_mdc_bytes(path)
    # held open over all 3 x 1024 frames the cache grows ~55 bytes per frame read (+110 KB here)
    assert sizes[n - 1] <= sizes[block - 1] + 16 * 1024, sizes


def test_reduction_retains_no_python_state_per_frame(tmp_path, monkeypatch):
    """The Python heap after each committed block (16 frames) is the same after 10 and after 50 blocks."""
    block, n_blocks = 16, 50
    path = tmp_path / "stack.h5"
    _stack(path, block * n_blocks)
    traced = []
    append = writer_lib.SparseWriter.append

    def traced_append(self, *args, **kwargs):
        append(self, *args, **kwargs)
        traced.append(tracemalloc.get_traced_memory()[0])

    config = reduce_lib.ReduceConfig(images=(str(path),), out=tmp_path / "reduced.h5", geometry=GEOMETRY,
                                     block_frames=block)
    monkeypatch.setattr(writer_lib.SparseWriter, "append", traced_append)
    tracemalloc.start()
    try:
        reduce_lib.run(config, log=lambda s: None)
    finally:
        tracemalloc.stop()
    assert len(traced) == n_blocks
    # 640 frames between the two samples: keeping 25 bytes per frame (an int or float in a list per frame)
    # would add 16 KB; what does grow meanwhile (~6 KB measured) are CPython's free lists of small tuples
    # filling up (freed tuples stay traced), which are bounded
    assert traced[-1] - traced[9] < 16 * 1024, (traced[9], traced[-1])
