"""What ``python -m emcjax.simulate`` draws: :class:`SimulationConfig` (detector, crystal, orientations, photons,
count model, blank and two-crystal frames), checked on construction."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal

from emcjax.detector import DetectorGeometry
from emcjax.errors import ConfigError
from emcjax.likelihood import LikelihoodConfig


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Defaults: the reference experiment scaled down."""

    out: pathlib.Path | None = None
    """Output HDF5 file (required on the command line)."""
    n_frames: int = 2000
    """Number of frames."""
    geometry: DetectorGeometry = DetectorGeometry()
    """Detector geometry (the resolution limit of the pixels is geometry.resolution_max_A)."""
    cell: tuple[float, float, float, float, float, float] = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
    """Unit cell a, b, c (Å), alpha, beta, gamma (degrees)."""
    space_group: str = "P 43 21 2"
    """Space group symbol (any of the 230, as gemmi reads it)."""
    vn: int = 10
    """Voxel grid points per shortest reciprocal-lattice vector."""
    gw: float = 2.0
    """Peak support radius in grid spacings."""
    profile_width: float = 0.7
    """Standard deviation of the Gaussian peak profile, in grid spacings."""
    orientations: Literal["grid", "uniform"] = "grid"
    """True orientations: 'grid' draws rotations of the 600-cell sampling with --rotation-n (with its prior
    weights); 'uniform' draws continuous ones, uniform on SO(3) (truth/rotation_index is then -1)."""
    rotation_n: int = 4
    """600-cell refinement parameter of the 'grid' orientations; 0 is the same as --orientations uniform."""
    candidates: int = 0
    """Per-frame candidate lists (what spot-based preselection gives): the K rotations of the
    --candidate-n sampling nearest the true orientation (0: no candidate lists)."""
    candidate_n: int = 0
    """600-cell refinement parameter of the candidate rotations (0: --rotation-n)."""
    bragg_photons: float = 150.0
    """Mean number of Bragg photons per frame (at phi = 1)."""
    background_photons: float = 30.0
    """Mean number of background photons per frame."""
    phi_sigma: float = 0.3
    """Standard deviation of log(phi); phi has mean 1."""
    wilson_b: float = 10.0
    """B factor (Å^2) of the Wilson fall-off of the random intensities: mean I ~ exp(-B/(2 d^2))."""
    structure: pathlib.Path | None = None
    """PDB/mmCIF model: intensities |F|^2 from it (gemmi) instead of random Wilson intensities."""
    likelihood: str = "poisson"
    """Count model of the pixels: poisson, poisson-bgscale, negbin (emcjax.likelihood)."""
    dispersion: float = 100.0
    """negbin: dispersion r > 0 (photons); the counts' variance is mu + mu^2 / r."""
    background_scale: float = 1.0
    """poisson-bgscale: true background = this factor x the background written to the file."""
    seed: int = 0
    """Seed of every random draw (the data set is a deterministic function of the config)."""
    blank_fraction: float = 0.0
    """Fraction of frames with background only (no crystal hit; truth ``frame_kind`` 1)."""
    multi_fraction: float = 0.0
    """Fraction of frames with a second crystal in an orientation unrelated to the first by any rotation of the
    Laue group (truth ``frame_kind`` 2, ``second_quaternion``, ``second_phi``)."""
    multi_equal: bool = False
    """Give the second crystal the scale phi of the first (two crystals of equal strength) instead of an
    independent draw of the same law."""
    overwrite: bool = False
    """Replace an existing output file."""

    def __post_init__(self):
        for name in ("n_frames", "vn"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bragg_photons", "profile_width"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("background_photons", "phi_sigma", "rotation_n", "candidates", "candidate_n"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.orientations not in ("grid", "uniform"):
            raise ConfigError(f"orientations must be 'grid' or 'uniform', got {self.orientations!r}")
        if self.candidates and self.candidate_sampling_n < 1:
            raise ConfigError("candidates: give the sampling of the candidate lists with --candidate-n N (>= 1)")
        for name in ("blank_fraction", "multi_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.blank_fraction + self.multi_fraction > 1:
            raise ConfigError(
                f"blank_fraction + multi_fraction must be <= 1, got {self.blank_fraction} + {self.multi_fraction}"
            )
        self.likelihood_config()  # checks the name and parameters

    def likelihood_config(self) -> LikelihoodConfig:
        """The count model's config (from the flat command-line fields)."""
        return LikelihoodConfig(name=self.likelihood, dispersion=self.dispersion, background_scale=self.background_scale)

    @property
    def continuous(self) -> bool:
        """Whether the true orientations are continuous (uniform on SO(3)) rather than grid rotations."""
        return self.orientations == "uniform" or self.rotation_n == 0

    @property
    def candidate_sampling_n(self) -> int:
        """600-cell parameter of the candidate lists (``candidate_n``, else ``rotation_n``)."""
        return self.candidate_n or self.rotation_n
