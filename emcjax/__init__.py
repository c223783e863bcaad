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

_heap.single_arena()  # before JAX's threads allocate: blocks freed by one thread are reused by the next (emcjax.heap)

from emcjax.crystal import Crystal as Crystal  # noqa: E402
from emcjax.data import SparseDataset as SparseDataset  # noqa: E402
from emcjax.data import SparseFrames as SparseFrames  # noqa: E402
from emcjax.data import write_dataset as write_dataset  # noqa: E402
from emcjax.detector import DetectorGeometry as DetectorGeometry  # noqa: E402
from emcjax.detector import make_detector as make_detector  # noqa: E402
from emcjax.emc import EMCConfig as EMCConfig  # noqa: E402
from emcjax.emc import EMCState as EMCState  # noqa: E402
from emcjax.emc import initial_state as initial_state  # noqa: E402
from emcjax.emc import init_state as init_state  # noqa: E402
from emcjax.emc import iterate as iterate  # noqa: E402
from emcjax.emc import make_step as make_step  # noqa: E402
from emcjax.emc import setup_problem as setup_problem  # noqa: E402
from emcjax.errors import EmcjaxError as EmcjaxError  # noqa: E402
from emcjax.model import make_grid as make_grid  # noqa: E402
from emcjax.rotations import crystal_from_lab as crystal_from_lab  # noqa: E402
from emcjax.sampling_600cell import sample_600cell as sample_600cell  # noqa: E402

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
