"""emcjax: EMC reconstruction of Bragg intensities from sparse, unoriented diffraction frames.

The public surface (the modules stay importable for everything else):

* geometry and crystal: :class:`DetectorGeometry`, :func:`make_detector`, :class:`Crystal`;
* rotations: :func:`sample_600cell`, :func:`crystal_from_lab`;
* the model: :func:`make_grid`;
* data: :class:`SparseDataset`, :class:`SparseFrames`, :func:`write_dataset`;
* the EMC: :class:`EMCConfig`, :class:`EMCState`, :func:`setup_problem`, :func:`initial_state`, :func:`iterate`;
  the pure step: :func:`make_step` (``init``/``update``), :func:`init_state`; likelihoods in ``emcjax.likelihood``;
* errors: :class:`EmcjaxError` (and its subclasses in ``emcjax.errors``).

Runners: ``python -m emcjax.simulate``, ``python -m emcjax.lowres``, ``python -m emcjax.legacy``; from detector
images (emcjax.frontend): ``python -m emcjax.simulate_images``, ``python -m emcjax.reduce``, ``python -m emcjax.orient``.
"""

from emcjax import heap as _heap

_heap.single_arena()  # first, before JAX starts its threads: one heap arena for all of them (emcjax.heap)

from emcjax.crystal import Crystal as Crystal
from emcjax.data import SparseDataset as SparseDataset
from emcjax.data import SparseFrames as SparseFrames
from emcjax.data import write_dataset as write_dataset
from emcjax.detector import DetectorGeometry as DetectorGeometry
from emcjax.detector import make_detector as make_detector
from emcjax.emc import EMCConfig as EMCConfig
from emcjax.emc import EMCState as EMCState
from emcjax.emc import initial_state as initial_state
from emcjax.emc import init_state as init_state
from emcjax.emc import iterate as iterate
from emcjax.emc import make_step as make_step
from emcjax.emc import setup_problem as setup_problem
from emcjax.errors import EmcjaxError as EmcjaxError
from emcjax.model import make_grid as make_grid
from emcjax.rotations import crystal_from_lab as crystal_from_lab
from emcjax.sampling_600cell import sample_600cell as sample_600cell

__version__ = "0.1.0"

__all__ = [
    "Crystal",
    "DetectorGeometry",
    "EMCConfig",
    "EMCState",
    "EmcjaxError",
    "SparseDataset",
    "SparseFrames",
    "crystal_from_lab",
    "init_state",
    "initial_state",
    "iterate",
    "make_step",
    "make_detector",
    "make_grid",
    "sample_600cell",
    "setup_problem",
    "write_dataset",
]
