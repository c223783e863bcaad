"""Likelihood models of the photon counts, chosen by name.

Built in (``LIKELIHOODS``):

* ``"poisson"``: :class:`Poisson`, the reference program's model (no parameters).
* ``"poisson-bgscale"``: :class:`PoissonBackgroundScale`, the data set's background times a per-frame
  scale (``background_scale``: one value or one per frame; ``n_frames`` makes it per frame).
* ``"negbin"``: :class:`NegativeBinomial`, over-dispersed counts (``dispersion`` r > 0).

``make_likelihood(name, **params)`` builds one and checks its parameters; :class:`LikelihoodConfig` is the
command-line form. A new model is a :func:`likelihood_dataclass` subclass of :class:`Likelihood`
registered with :func:`register_likelihood` (docs/RESEARCH.md shows one).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

from emcjax.errors import ConfigError
from emcjax.likelihood.base import Likelihood, likelihood_dataclass, per_frame
from emcjax.likelihood.negbinom import NegativeBinomial
from emcjax.likelihood.poisson import Poisson, PoissonBackgroundScale

Factory = Callable[..., Likelihood]


def _positive(name: str, value) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim > 1 or array.size == 0 or not np.all(np.isfinite(array) & (array > 0)):
        raise ConfigError(f"{name} must be a finite number > 0 (or one per frame), got {value!r}")
    return array


def _poisson() -> Poisson:
    return Poisson()


def _poisson_bgscale(background_scale=1.0, n_frames: int | None = None) -> PoissonBackgroundScale:
    scale = _positive("background_scale", background_scale)
    if n_frames is not None:
        if scale.ndim == 1 and scale.shape[0] != n_frames:
            raise ConfigError(f"background_scale holds {scale.shape[0]} values, expected one per frame ({n_frames})")
        scale = np.broadcast_to(scale, (n_frames,))
    return PoissonBackgroundScale(scale=jnp.asarray(scale, dtype=float))


def _negbin(dispersion=100.0) -> NegativeBinomial:
    return NegativeBinomial(dispersion=jnp.asarray(_positive("dispersion", dispersion), dtype=float))


LIKELIHOODS: dict[str, Factory] = {"poisson": _poisson, "poisson-bgscale": _poisson_bgscale, "negbin": _negbin}
"""Name -> factory. A factory takes the model's parameters as keyword arguments (``n_frames`` when it has
per-frame parameters), checks them (:class:`~emcjax.errors.ConfigError`) and returns a :class:`Likelihood`."""


def register_likelihood(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Makes ``make_likelihood(name, ...)`` and ``LikelihoodConfig(name=name)`` build ``factory(...)``.

    Args:
      name: the model's name (as given on the command line).
      factory: callable taking the model's parameters as keyword arguments and returning a Likelihood;
        parameters named like :class:`LikelihoodConfig` fields (``dispersion``, ``background_scale``,
        ``n_frames``) are filled from the config.
      replace: allow replacing an existing name.
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"likelihood name must be a non-empty string, got {name!r}")
    if name in LIKELIHOODS and not replace:
        raise ConfigError(f"likelihood {name!r} is already registered (pass replace=True to replace it)")
    if not callable(factory):
        raise ConfigError(f"likelihood {name!r}: the factory must be callable, got {factory!r}")
    LIKELIHOODS[name] = factory


def _factory(name: str) -> Factory:
    if name not in LIKELIHOODS:
        raise ConfigError(f"likelihood: unknown name {name!r}; choose one of {', '.join(sorted(LIKELIHOODS))}")
    return LIKELIHOODS[name]


def _parameters(factory: Factory) -> list[str]:
    return list(inspect.signature(factory).parameters)


def make_likelihood(name: str, **params) -> Likelihood:
    """The likelihood ``name`` with the given parameters (e.g. ``make_likelihood("negbin", dispersion=50.0)``)."""
    factory = _factory(name)
    allowed = _parameters(factory)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"likelihood {name!r} takes no parameter {', '.join(unknown)}; it takes: {', '.join(allowed) or 'none'}"
        )
    return factory(**params)


@dataclasses.dataclass(frozen=True)
class LikelihoodConfig:
    """Which count model to use and its parameters (each model reads the fields it needs)."""

    name: str = "poisson"
    """Model name: poisson, poisson-bgscale, negbin (or one added with register_likelihood)."""
    dispersion: float = 100.0
    """negbin: dispersion r > 0 in photons (variance mu + mu^2 / r; larger is closer to Poisson)."""
    background_scale: float = 1.0
    """poisson-bgscale: factor > 0 on the data set's background, the same initial value for every frame."""

    def __post_init__(self) -> None:
        _factory(self.name)
        for field in ("dispersion", "background_scale"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"likelihood.{field} must be a finite number > 0, got {value!r}")

    def build(self, n_frames: int | None = None) -> Likelihood:
        """The configured likelihood; per-frame parameters get ``n_frames`` values."""
        factory = _factory(self.name)
        available = {"dispersion": self.dispersion, "background_scale": self.background_scale, "n_frames": n_frames}
        return factory(**{k: available[k] for k in _parameters(factory) if k in available})


__all__ = [
    "LIKELIHOODS",
    "Likelihood",
    "LikelihoodConfig",
    "NegativeBinomial",
    "Poisson",
    "PoissonBackgroundScale",
    "likelihood_dataclass",
    "make_likelihood",
    "per_frame",
    "register_likelihood",
]
