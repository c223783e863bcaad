"""The settings of ``python -m emcjax.pipeline`` (:class:`PipelineConfig`, one dataclass per stage group) and
:func:`check`, which refuses settings that cannot run before anything is written."""

from __future__ import annotations

import dataclasses
import pathlib

from emcjax import emc as emc_lib
from emcjax.errors import ConfigError
from emcjax.frontend.orient import OrientConfig
from emcjax.frontend.reduce import ReduceConfig
from emcjax.merge import reject as reject_lib
from emcjax.merge import stats as stats_lib


@dataclasses.dataclass(frozen=True)
class LowresStage:
    """Settings of the EMC runs (all frames, then each half set)."""

    iters: int = 30
    """EMC iterations of each run."""
    seed: int = 0
    """Seed of the random initial model (each half draws its own from it)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept per run."""
    emc: emc_lib.EMCConfig = dataclasses.field(default_factory=emc_lib.EMCConfig)
    """EMC algorithm settings (python -m emcjax.lowres --help)."""


@dataclasses.dataclass(frozen=True)
class RejectStage:
    """Frame rejection after the all-frames run."""

    criteria: reject_lib.RejectionCriteria = dataclasses.field(default_factory=reject_lib.RejectionCriteria)
    """Thresholds of the tests."""
    photon_test: bool = True
    """Test the photons outside the predicted peaks."""
    evidence_test: bool = True
    """The Bayes-factor tests for a crystal and a second crystal (no_crystal, second_crystal)."""
    drop: tuple[reject_lib.Reason, ...] = tuple(reject_lib.REASONS)
    """Reasons that set a frame's weight to 0, i.e. leave it out of highres and the half sets (every reason is
    still flagged and counted); e.g. drop = ["phi_zero"] leaves out only the blank frames and keeps the
    two-crystal ones, whose leading crystal EMC fits (python -m emcjax.reject --drop)."""


@dataclasses.dataclass(frozen=True)
class HighresStage:
    """The local update to a higher resolution (python -m emcjax.highres) after the low-resolution runs."""

    enabled: bool = False
    """Run it: on the kept frames after reject, and on each half set after its low-res run (the merging table
    and the MTZ then come from the high-resolution half sets). Needs lowres.emc.d_min, the low-res cutoff."""
    resolution: float | None = None
    """High-resolution limit d_min in Å (None: the data set's resolution_max_A, the detector's edge)."""
    iters: int = 5
    """EMC iterations of each high-resolution run."""
    fine_n: int = 0
    """600-cell parameter of the fine sampling (0: ceil(n_c x res_coarse / res_fine), the reference's)."""
    min_probability: float = 0.01
    """Coarse rotations a frame kept with at least this probability contribute their fine neighbours."""
    max_kept: int = 32
    """At most this many fine rotations are kept per frame and E-step."""
    refine_phi: bool = False
    """Refine phi (False: the low-res run's, as in the reference)."""


@dataclasses.dataclass(frozen=True)
class HalvesStage:
    """The two half sets."""

    split: str = "parity"
    """'parity' (frame index) or 'random' (seeded by --halves.split-seed)."""
    split_seed: int = 0
    """Seed of the random split."""


@dataclasses.dataclass(frozen=True)
class ResolutionStage(stats_lib.MergingOptions):
    """Merging statistics."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Images (or a sparse data set) to merged intensities in an MTZ."""

    images: tuple[str, ...] = ()
    """Detector images: CBF files, quoted glob patterns or HDF5 stacks (reduced first). Or give --data."""
    data: pathlib.Path | None = None
    """A sparse data set (docs/FORMATS.md) instead of images: reduce is skipped (orient too, when it carries
    candidate orientations or no spots)."""
    out: pathlib.Path = pathlib.Path("runs/pipeline")
    """Directory of every stage's output, pipeline.json (the stages done) and summary.txt."""
    config: pathlib.Path | None = None
    """TOML file whose values become the defaults of all other fields (flags override)."""
    reduce: ReduceConfig = dataclasses.field(default_factory=ReduceConfig)
    """Data reduction (its images, out, resume and overwrite are the pipeline's)."""
    orient: OrientConfig = dataclasses.field(default_factory=OrientConfig)
    """Candidate orientations (its data, out, resume and overwrite are the pipeline's)."""
    lowres: LowresStage = dataclasses.field(default_factory=LowresStage)
    """The EMC runs."""
    reject: RejectStage = dataclasses.field(default_factory=RejectStage)
    """Frame rejection."""
    highres: HighresStage = dataclasses.field(default_factory=HighresStage)
    """The local update to a higher resolution (off unless highres.enabled)."""
    halves: HalvesStage = dataclasses.field(default_factory=HalvesStage)
    """Half sets."""
    resolution: ResolutionStage = dataclasses.field(default_factory=ResolutionStage)
    """Merging statistics and the suggested resolution limit."""
    keep_all: bool = False
    """Export every reflection (default: only those to the suggested resolution limit)."""


def check(config: PipelineConfig) -> None:
    """Raises ConfigError for settings that cannot run (before anything is written)."""
    if bool(config.images) == (config.data is not None):
        raise ConfigError("give the detector images (--images 'run1/*.cbf') or a sparse data set (--data FILE.h5), "
                          "not both")
    if config.halves.split not in ("parity", "random"):
        raise ConfigError(f"halves.split must be 'parity' or 'random', got {config.halves.split!r}")
    for name, value in (("lowres.iters", config.lowres.iters), ("highres.iters", config.highres.iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    h, d_low = config.highres, config.lowres.emc.d_min
    if h.enabled and d_low is None:
        raise ConfigError("highres.enabled needs lowres.emc.d_min: the low-resolution cutoff in Å (e.g. 6.0) of the "
                          "runs the local update starts from")
    if h.enabled and h.resolution is not None and not 0 < h.resolution < d_low:
        raise ConfigError(f"highres.resolution must be > 0 and below lowres.emc.d_min = {d_low} Å, got {h.resolution!r}")
