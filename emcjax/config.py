"""Settings of the EMC algorithm (what the reference program read from config.ini)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from emcjax.errors import ConfigError
from emcjax.likelihood import LikelihoodConfig


@dataclasses.dataclass(frozen=True)
class EMCConfig:
    """Settings of the EMC algorithm."""

    rotation_n: int = 4
    """600-cell refinement parameter n of the orientation sampling (10(5n^3+n) rotations); used when the data
    set carries no candidate lists."""
    reduce_by_symmetry: bool = True
    """Evaluate one rotation per orbit of the point-group operations that map the grid onto itself (exact:
    the same posterior, up to |H| x faster; 4x for 422 on the 600-cell)."""
    vn: int = 10
    """Voxel grid points per shortest reciprocal-lattice vector."""
    gw: float = 2.0
    """Peak support radius, in grid spacings (min|a*|/vn)."""
    d_min: float | None = None
    """High-resolution limit in Å (default: the data set's detector limit)."""
    likelihood: str = "poisson"
    """Count model: poisson, poisson-bgscale, negbin (or a name added with emcjax.likelihood.register_likelihood)."""
    dispersion: float = 100.0
    """negbin: dispersion r > 0 (photons; variance mu + mu^2/r)."""
    background_scale: float = 1.0
    """poisson-bgscale: initial factor > 0 on every frame's background."""
    refine_background: bool = False
    """poisson-bgscale: refine every frame's background scale in the M-step (per-frame Newton on the expected
    log-likelihood, emcjax.core.background)."""
    refine_background_shells: bool = False
    """Poisson likelihoods: correct the data set's background by a factor per resolution shell, shared by all
    frames and refined in the M-step (Newton on the expected log-likelihood, emcjax.core.background_shells);
    with refine_background the factors have background-weighted mean 1 and the per-frame scales the level.
    Needs every block in memory (no stream), one rotation set (no candidate lists) and no orientation
    refinement."""
    intensity_update: Literal["auto", "reference", "mlem", "gradient"] = "auto"
    """Intensity M-step: the reference's per-pixel ML + compress (see docs/METHOD-NOTES.md), multiplicative
    EM on voxels (both closed-form Poisson), or optax steps on the expected log-likelihood (any likelihood;
    phi then also by gradient). auto: reference for Poisson likelihoods, gradient otherwise."""
    inner_iterations: int = 1
    """MLEM sub-iterations per intensity M-step (no new E-step between them)."""
    gradient_steps: int = 20
    """Adam steps per gradient M-step."""
    gradient_learning_rate: float = 0.05
    """Adam step size of the gradient M-step (in log intensity / log phi)."""
    update_phi: bool = True
    """Alternate (E-step, intensity update) with (E-step, phi update); False keeps phi fixed."""
    responsibilities: Literal["pruned", "soft"] = "pruned"
    """pruned: the reference's rule (prune_mass, prune_min, max_kept); soft: the full posterior."""
    prune_mass: float = 0.999
    """Keep the most likely rotations of a frame until this much probability mass is covered."""
    prune_min: float = 1e-4
    """Drop rotations with a probability below this."""
    max_kept: int = 32
    """At most this many rotations are kept per frame (top-k)."""
    inverse_temperature: float = 1.0
    """beta of the E-step posterior w_r p(K|r)^beta (1: plain EM; < 1: deterministic annealing); with
    anneal_iterations > 0 the value the annealing schedule ends at."""
    anneal_from: float = 1.0
    """Deterministic annealing: beta of the first iteration, raised geometrically to inverse_temperature over
    anneal_iterations iterations (see inverse_temperature_at)."""
    anneal_iterations: int = 0
    """Iterations of the annealing ramp (0: no annealing, beta = inverse_temperature throughout)."""
    block_frames: int = 0
    """Frames per block of the E-step (0: all frames in one block); memory grows with the block, not the data."""
    stream: bool = False
    """Re-read and re-join each block from disk at every E-step (the next block is prepared while the devices
    work on the current one) instead of keeping every block's join in memory. A full search on one process
    (Poisson, reference or mlem update) joins on the device and keeps only per-block M-step statistics
    (emcjax.streaming: memory O(block)); otherwise every block's kept pairs are held for the M-steps."""
    candidate_path: Literal["table", "direct", "auto"] = "table"
    """Frames with candidate lists: "table" builds the in-peak entries of every block's candidates and joins
    the photons with them; "direct" tests every (photon, candidate) pair on the device and builds entries of
    the kept rotations only (emcjax.direct, one device); "auto" picks by the cost estimate of
    emcjax.candidate_path.choose_path (docs/ARCHITECTURE.md)."""
    candidate_signal: Literal["exact", "tabulated"] = "exact"
    """Direct path: the expected signal S summed exactly over in-peak pixels, or from tabulated per-reflection
    cut integrals (emcjax.core.cut_signal; for detectors whose peaks span many pixels)."""
    refine_orientations: bool = False
    """Refine each frame's most probable rotations off the grid by gradient ascent of its log-likelihood, and
    use them (with the frame's grid candidates) in the next E- and M-steps (emcjax.refinement)."""
    refine_start: int = 3
    """Refine once this many iterations are done (the model must mean something first)."""
    refine_every: int = 1
    """Refine at every this many iterations from refine_start; the iterations between reuse the last refined
    candidates (refinement costs about one E-step per start rotation and Adam step)."""
    refine_top_k: int = 2
    """Rotations refined per frame: its k most probable of the last E-step."""
    refine_steps: int = 30
    """Adam steps of each refinement."""
    refine_max_angle_deg: float = 2.0
    """Largest rotation of a refinement away from its start (degrees)."""
    refine_learning_rate_deg: float = 0.2
    """Adam step size of the refinement (degrees, cosine-decayed over the steps)."""

    def __post_init__(self):
        positive = {"rotation_n": self.rotation_n, "inner_iterations": self.inner_iterations,
                    "max_kept": self.max_kept, "gradient_steps": self.gradient_steps,
                    "refine_top_k": self.refine_top_k, "refine_steps": self.refine_steps,
                    "refine_every": self.refine_every}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not 0 < self.prune_mass <= 1:
            raise ConfigError(f"prune_mass must be in (0, 1], got {self.prune_mass}")
        if not 0 <= self.prune_min < 1:
            raise ConfigError(f"prune_min must be in [0, 1), got {self.prune_min}")
        if not 0 < self.inverse_temperature <= 1:
            raise ConfigError(f"inverse_temperature must be in (0, 1], got {self.inverse_temperature}")
        if not 0 < self.anneal_from <= 1:
            raise ConfigError(f"anneal_from must be in (0, 1], got {self.anneal_from}")
        if self.anneal_iterations < 0:
            raise ConfigError(f"anneal_iterations must be >= 0 (0: no annealing), got {self.anneal_iterations}")
        if not self.gradient_learning_rate > 0:
            raise ConfigError(f"gradient_learning_rate must be > 0, got {self.gradient_learning_rate}")
        if self.refine_start < 0:
            raise ConfigError(f"refine_start must be >= 0, got {self.refine_start}")
        if not (self.refine_max_angle_deg > 0 and self.refine_learning_rate_deg > 0):
            raise ConfigError(
                f"refine_max_angle_deg and refine_learning_rate_deg must be > 0, got {self.refine_max_angle_deg} "
                f"and {self.refine_learning_rate_deg}"
            )
        if self.block_frames < 0:
            raise ConfigError(f"block_frames must be >= 0 (0: one block), got {self.block_frames}")
        if self.intensity_update not in ("auto", "mlem", "reference", "gradient"):
            raise ConfigError(
                f"intensity_update must be 'auto', 'reference', 'mlem' or 'gradient', got {self.intensity_update!r}"
            )
        if self.candidate_path not in ("table", "direct", "auto"):
            raise ConfigError(f"candidate_path must be 'table', 'direct' or 'auto', got {self.candidate_path!r}")
        if self.candidate_signal not in ("exact", "tabulated"):
            raise ConfigError(f"candidate_signal must be 'exact' or 'tabulated', got {self.candidate_signal!r}")
        if self.responsibilities not in ("pruned", "soft"):
            raise ConfigError(f"responsibilities must be 'pruned' or 'soft', got {self.responsibilities!r}")
        if self.refine_background and not hasattr(self.likelihood_model(1), "scale"):
            raise ConfigError(
                f"refine_background needs a likelihood with a per-frame background scale (poisson-bgscale), "
                f"got likelihood={self.likelihood!r}"
            )
        if self.refine_background_shells:
            if not self.likelihood_model(1).poisson_counts:
                raise ConfigError(f"refine_background_shells needs a Poisson likelihood (poisson, poisson-bgscale), "
                                  f"got likelihood={self.likelihood!r}")
            if self.stream or self.refine_orientations:
                raise ConfigError("refine_background_shells runs in the fused step only: set stream=False and "
                                  "refine_orientations=False")
        if self.intensity_rule in ("reference", "mlem") and not self.likelihood_model(1).poisson_counts:
            raise ConfigError(
                f"likelihood={self.likelihood!r} has no closed-form M-step: set intensity_update='gradient' "
                f"(--emc.intensity-update gradient); 'reference' and 'mlem' are Poisson updates"
            )

    def inverse_temperature_at(self, iteration: int) -> float:
        """beta of the E-steps of the iteration that follows ``iteration`` done ones (0-based).

        Geometric ramp: beta_i = anneal_from x (inverse_temperature / anneal_from)^(i / anneal_iterations) for
        i < anneal_iterations, then inverse_temperature (Dragonfly's ``beta_schedule`` multiplies beta by a
        fixed factor every few iterations: the same ramp in steps).
        """
        if iteration >= self.anneal_iterations:
            return float(self.inverse_temperature)
        ratio = self.inverse_temperature / self.anneal_from
        return float(self.anneal_from * ratio ** (iteration / self.anneal_iterations))

    @property
    def intensity_rule(self) -> str:
        """The intensity update used: ``intensity_update`` with auto resolved by the likelihood."""
        if self.intensity_update != "auto":
            return self.intensity_update
        return "reference" if self.likelihood_model(1).poisson_counts else "gradient"

    def likelihood_config(self) -> LikelihoodConfig:
        return LikelihoodConfig(name=self.likelihood, dispersion=self.dispersion, background_scale=self.background_scale)

    def likelihood_model(self, n_frames: int):
        """The configured likelihood object (per-frame parameters for ``n_frames`` frames)."""
        return self.likelihood_config().build(n_frames)

    @property
    def kept_rotations(self) -> int:
        """Top-k cap of the responsibilities (every slot for soft responsibilities)."""
        return 1 << 30 if self.responsibilities == "soft" else self.max_kept

    @property
    def thresholds(self) -> tuple[float, float]:
        """(prune_mass, prune_min) of the E-step (1, 0 for soft responsibilities)."""
        return (1.0, 0.0) if self.responsibilities == "soft" else (self.prune_mass, self.prune_min)
