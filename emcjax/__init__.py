"""emcjax: EMC reconstruction of Bragg intensities from sparse, unoriented diffraction frames."""

__version__ = "0.1.0"
