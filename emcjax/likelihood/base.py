"""The likelihood protocol: the photon-count model of one detector pixel, as a JAX pytree.

EMC (METHOD.md §5) models the count ``K`` of valid pixel t in frame d at orientation r as a draw with
expected photons

    mu = b + s,      b = background_mean(pol_t B_d(shell_t), d),      s = pol_t phi_d W_rt >= 0,

where ``background`` (pol x B, > 0, photons) is the data set's known background at the pixel and
``bragg`` (s, photons) the model's Bragg signal. The E-step's log-likelihood of a (frame, rotation) pair
splits, up to a per-frame constant, into

    sum over pixels in the rotation's peaks      zero_term(s, b)                     (every pixel)
  + sum over photon pixels in those peaks         photon_excess(K, s, b)              (K >= 1 only),

because a pixel outside the peaks (s = 0) contributes log p(K | b) whatever the rotation. The per-frame
constant is ``sum_t log_prob(K_t, background_mean(...))`` over all valid pixels.

A likelihood is a frozen dataclass registered with ``jax.tree_util.register_dataclass`` (use the
:func:`likelihood_dataclass` decorator): its parameters are array fields (pytree leaves, so ``jax.grad``,
``jax.vmap`` and ``jax.jit`` see them as traced values), configuration that changes shapes or code paths is
a ``dataclasses.field(metadata=dict(static=True))`` field. Every method is elementwise over broadcastable
arrays and safe under ``jit``/``vmap``/``grad``: no NaN values or gradients at ``bragg = 0`` or
``count = 0``. Constructors do not validate (JAX rebuilds the object from tracers); the factories of
:mod:`emcjax.likelihood` do.

A subclass must define :meth:`Likelihood.log_prob` and :meth:`Likelihood.sample`; the default
:meth:`~Likelihood.photon_excess` and :meth:`~Likelihood.zero_term` are derived from ``log_prob`` and may be
overridden by closed forms (more accurate when ``bragg << background``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, TypeVar

import jax

from emcjax.errors import ConfigError

_T = TypeVar("_T")


def likelihood_dataclass(cls: type[_T]) -> type[_T]:
    """Class decorator: a frozen dataclass registered as a JAX pytree (array fields are leaves)."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


class Likelihood(abc.ABC):
    """Count model of one pixel. See the module docstring for the contract.

    Arguments shared by the methods (all broadcast elementwise):
      count: integer or float photon counts K >= 0.
      mean: expected photons mu > 0.
      bragg: expected Bragg photons s = pol * phi * W >= 0.
      background: the data set's expected background photons pol * B > 0 (before :meth:`background_mean`).
      frame: int32 global frame index of each element (selects per-frame parameters); ``None`` is allowed
        when the model has no per-frame parameters.
    """

    linear_zero_term: ClassVar[bool] = False
    """True when ``zero_term(bragg, ...) == -bragg`` exactly: the E-step may then use phi * S(rotation, shell)
    instead of summing the zero-count term over every in-peak pixel."""

    poisson_counts: ClassVar[bool] = False
    """True when counts are Poisson with mean ``background_mean + bragg``: a simulator may then draw the Bragg
    and background photons separately (sparse) instead of calling :meth:`sample` on every pixel."""

    def background_mean(self, background: jax.Array, frame: jax.Array | None = None) -> jax.Array:
        """Expected background photons b of a pixel given the data set's pol * B (identity by default)."""
        del frame
        return background

    @abc.abstractmethod
    def log_prob(self, count: jax.Array, mean: jax.Array, frame: jax.Array | None = None) -> jax.Array:
        """log p(count | mean) in nats, the full normalised log pmf."""

    @abc.abstractmethod
    def sample(self, key: jax.Array, mean: jax.Array, frame: jax.Array | None = None) -> jax.Array:
        """int32 counts drawn with expected photons ``mean`` (shape of ``mean``)."""

    def zero_term(self, bragg: jax.Array, background: jax.Array, frame: jax.Array | None = None) -> jax.Array:
        """log p(0 | b + s) - log p(0 | b) in nats: what a zero-count in-peak pixel adds (<= 0)."""
        b = self.background_mean(background, frame)
        return self.log_prob(0, b + bragg, frame) - self.log_prob(0, b, frame)

    def photon_excess(
        self, count: jax.Array, bragg: jax.Array, background: jax.Array, frame: jax.Array | None = None
    ) -> jax.Array:
        """[log p(K | b + s) - log p(K | b)] - zero_term(s, b) in nats: what an in-peak pixel with K >= 1
        photons adds beyond the zero-count term."""
        b = self.background_mean(background, frame)
        excess = self.log_prob(count, b + bragg, frame) - self.log_prob(count, b, frame)
        return excess - self.zero_term(bragg, background, frame)


def per_frame(value: jax.Array, frame: jax.Array | None, name: str) -> jax.Array:
    """``value`` for each element: itself when scalar, ``value[frame]`` when it holds one value per frame."""
    if value.ndim == 0:
        return value
    if frame is None:
        raise ConfigError(f"{name} holds one value per frame ({value.shape}): pass the frame index of each element")
    return value[frame]
