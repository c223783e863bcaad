"""Negative-binomial (gamma-Poisson) counts: over-dispersed photons, variance mu + mu^2 / r.

With dispersion r > 0 (r -> inf is Poisson):

    log p(K | mu) = log Gamma(K + r) - log Gamma(r) - log K! - r log1p(mu / r) + K log(mu / (r + mu)),

which is scipy.stats.nbinom(n=r, p=r / (r + mu)). For mu = b + s the E-step terms are

    zero_term     = -r log1p(s / (r + b))                          (-> -s as r -> inf; not linear in s)
    photon_excess = K [log1p(s / b) - log1p(s / (r + b))]           (-> K log1p(s / b)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import betaln, gammaln

from emcjax.likelihood.base import Likelihood, likelihood_dataclass, per_frame


@likelihood_dataclass
class NegativeBinomial(Likelihood):
    """Negative-binomial counts with mean mu and variance mu + mu^2 / r.

    Attributes:
      dispersion: () or (n_frames,) float r > 0 (photons; larger is closer to Poisson).
    """

    dispersion: jax.Array

    def _r(self, frame):
        return per_frame(jnp.asarray(self.dispersion), frame, "dispersion")

    def log_prob(self, count, mean, frame=None):
        r = self._r(frame)
        count = jnp.asarray(count, jnp.result_type(mean, r, float))
        # log Gamma(K + r) / Gamma(r) = log Gamma(K) - log B(K, r): no cancellation of two huge lgammas at large r
        positive = count > 0
        k = jnp.where(positive, count, 1.0)
        rising = jnp.where(positive, gammaln(k) - betaln(k, r), 0.0)
        return rising - gammaln(count + 1) - r * jnp.log1p(mean / r) + count * (jnp.log(mean) - jnp.log(r + mean))

    def sample(self, key, mean, frame=None):
        r = jnp.broadcast_to(self._r(frame), jnp.shape(mean))
        key_gamma, key_poisson = jax.random.split(key)
        rate = jax.random.gamma(key_gamma, r, dtype=jnp.result_type(mean, r, float)) / r
        return jax.random.poisson(key_poisson, mean * rate, jnp.shape(mean)).astype(jnp.int32)

    def zero_term(self, bragg, background, frame=None):
        r = self._r(frame)
        return -r * jnp.log1p(bragg / (r + self.background_mean(background, frame)))

    def photon_excess(self, count, bragg, background, frame=None):
        r = self._r(frame)
        b = self.background_mean(background, frame)
        return count * (jnp.log1p(bragg / b) - jnp.log1p(bragg / (r + b)))
