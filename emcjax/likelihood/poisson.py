"""Poisson count models: the default EMC likelihood, and one with a per-frame background scale.

    log p(K | mu) = K log mu - mu - log K!

With mu = b + s the zero-count term is exactly -s (``linear_zero_term``) and the photon term is
K log1p(s / b), as in emcjax.core.estep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from emcjax.likelihood.base import Likelihood, likelihood_dataclass, per_frame


class _PoissonCounts(Likelihood):
    """log_prob, sample and the closed-form E-step terms shared by the Poisson models."""

    linear_zero_term = True
    poisson_counts = True

    def log_prob(self, count, mean, frame=None):
        count = jnp.asarray(count, jnp.result_type(mean, float))
        return count * jnp.log(mean) - mean - gammaln(count + 1)

    def sample(self, key, mean, frame=None):
        return jax.random.poisson(key, mean, jnp.shape(mean)).astype(jnp.int32)

    def zero_term(self, bragg, background, frame=None):
        return -jnp.asarray(bragg)

    def photon_excess(self, count, bragg, background, frame=None):
        return count * jnp.log1p(bragg / self.background_mean(background, frame))


@likelihood_dataclass
class Poisson(_PoissonCounts):
    """Poisson counts with mean pol * (B + phi W): the reference program's model (no parameters)."""


@likelihood_dataclass
class PoissonBackgroundScale(_PoissonCounts):
    """Poisson counts with mean pol * (c_d B + phi W): the data set's background scaled per frame.

    Attributes:
      scale: () or (n_frames,) float background scale c_d > 0 (unit-less; 1 = the data set's background).
    """

    scale: jax.Array

    def background_mean(self, background, frame=None):
        return per_frame(jnp.asarray(self.scale), frame, "scale") * background
