"""Tests of emcjax.likelihood: the count models against scipy.stats, their E-step terms against the closed
forms and the Poisson limit, gradients against finite differences (float64), samplers against their
moments, pytree/jit/vmap behaviour, the registry, and the code shown in docs/RESEARCH.md."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import tyro

from emcjax.errors import ConfigError
from emcjax.likelihood import (
    LIKELIHOODS,
    Likelihood,
    LikelihoodConfig,
    NegativeBinomial,
    Poisson,
    PoissonBackgroundScale,
    make_likelihood,
    register_likelihood,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def float64():
    """float64 inside this module only (the other test modules run float32)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def random_inputs(seed: int, n: int = 200):
    """Counts 1..20, Bragg signal in [0, 10] (some exactly 0), background in [1e-3, 5], frames 0..4."""
    rng = np.random.default_rng(seed)
    count = rng.integers(1, 21, n).astype(np.float64)
    bragg = rng.uniform(0, 10, n) * (rng.random(n) > 0.1)
    background = np.exp(rng.uniform(np.log(1e-3), np.log(5), n))
    frame = rng.integers(0, 5, n).astype(np.int32)
    return count, bragg, background, frame


# ---------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("r", [0.3, 2.0, 50.0, 1e4])
def test_negbin_log_prob_equals_scipy(r):
    count = np.arange(0, 60, dtype=np.float64)[:, None]
    mean = np.array([1e-3, 0.1, 2.0, 30.0])[None, :]
    got = np.asarray(NegativeBinomial(jnp.asarray(r)).log_prob(count, mean))
    want = scipy.stats.nbinom.logpmf(count, r, r / (r + mean))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float64


def test_poisson_log_prob_equals_scipy_and_scale_multiplies_background():
    count = np.arange(0, 40, dtype=np.float64)[:, None]
    mean = np.array([1e-3, 0.5, 7.0, 30.0])[None, :]
    np.testing.assert_allclose(np.asarray(Poisson().log_prob(count, mean)), scipy.stats.poisson.logpmf(count, mean), rtol=1e-10, atol=1e-12)
    scaled = PoissonBackgroundScale(jnp.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(np.asarray(scaled.background_mean(jnp.array([4.0, 4.0, 4.0]), jnp.array([0, 1, 2]))), [2.0, 4.0, 8.0])
    np.testing.assert_allclose(np.asarray(PoissonBackgroundScale(jnp.asarray(3.0)).background_mean(2.0)), 6.0)
    with pytest.raises(ConfigError, match="one value per frame"):
        scaled.background_mean(jnp.ones(3))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_negbin_tends_to_poisson(dtype):
    count, bragg, background, _ = (jnp.asarray(x, dtype) for x in random_inputs(1))
    nb, po = NegativeBinomial(jnp.asarray(1e8, dtype)), Poisson()
    for name in ("photon_excess", "zero_term"):
        args = (count, bragg, background) if name == "photon_excess" else (bragg, background)
        got, want = np.asarray(getattr(nb, name)(*args)), np.asarray(getattr(po, name)(*args))
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-30, err_msg=name)
    mean = background + bragg
    np.testing.assert_allclose(np.asarray(nb.log_prob(count, mean)), np.asarray(po.log_prob(count, mean)), rtol=1e-4)


@pytest.mark.parametrize(
    "lik",
    [Poisson(), PoissonBackgroundScale(jnp.array([0.5, 0.8, 1.0, 1.7, 3.0])), NegativeBinomial(jnp.array([0.7, 3.0, 20.0, 1e3, 5.0]))],
    ids=["poisson", "poisson-bgscale", "negbin"],
)
def test_default_terms_equal_closed_forms(lik):
    """The protocol's defaults (from log_prob) equal each model's closed-form E-step terms."""
    count, bragg, background, frame = random_inputs(2)
    closed = lik.photon_excess(count, bragg, background, frame), lik.zero_term(bragg, background, frame)
    default = Likelihood.photon_excess(lik, count, bragg, background, frame), Likelihood.zero_term(lik, bragg, background, frame)
    for c, d in zip(closed, default):
        np.testing.assert_allclose(np.asarray(c), np.asarray(d), rtol=1e-9, atol=1e-9)
    # The terms are what the E-step needs: log p(K | b + s) - log p(K | b) = photon_excess + zero_term.
    b = lik.background_mean(background, frame)
    full = lik.log_prob(count, b + bragg, frame) - lik.log_prob(count, b, frame)
    np.testing.assert_allclose(np.asarray(full), np.asarray(closed[0] + closed[1]), rtol=1e-9, atol=1e-9)
    # Poisson: exactly what emcjax.core.estep computes.
    if lik.linear_zero_term:
        np.testing.assert_array_equal(np.asarray(closed[1]), -bragg)
    if isinstance(lik, Poisson):
        np.testing.assert_allclose(np.asarray(closed[0]), count * np.log1p(bragg / background), rtol=1e-12)


# ---------------------------------------------------------------------------------------------- gradients
def _central_difference(f, x: float, h: float) -> float:
    return (f(x + h) - f(x - h)) / (2 * h)


GRAD_CASES = {
    # name: (function of one scalar, point) -- count 3, bragg 1.3, background 0.4, frame 1
    "negbin photon_excess / bragg": (lambda x: NegativeBinomial(jnp.asarray(4.0)).photon_excess(3.0, x, 0.4), 1.3),
    "negbin photon_excess / background": (lambda x: NegativeBinomial(jnp.asarray(4.0)).photon_excess(3.0, 1.3, x), 0.4),
    "negbin photon_excess / dispersion": (lambda x: NegativeBinomial(x).photon_excess(3.0, 1.3, 0.4), 4.0),
    "negbin zero_term / bragg": (lambda x: NegativeBinomial(jnp.asarray(4.0)).zero_term(x, 0.4), 1.3),
    "negbin zero_term / background": (lambda x: NegativeBinomial(jnp.asarray(4.0)).zero_term(1.3, x), 0.4),
    "negbin zero_term / dispersion": (lambda x: NegativeBinomial(x).zero_term(1.3, 0.4), 4.0),
    "negbin log_prob / mean": (lambda x: NegativeBinomial(jnp.asarray(4.0)).log_prob(3.0, x), 1.7),
    "negbin log_prob / dispersion": (lambda x: NegativeBinomial(x).log_prob(3.0, 1.7), 4.0),
    "negbin log_prob(0) / dispersion": (lambda x: NegativeBinomial(x).log_prob(0.0, 1.7), 4.0),
    "poisson photon_excess / bragg": (lambda x: Poisson().photon_excess(3.0, x, 0.4), 1.3),
    "poisson photon_excess / background": (lambda x: Poisson().photon_excess(3.0, 1.3, x), 0.4),
    "poisson log_prob / mean": (lambda x: Poisson().log_prob(3.0, x), 1.7),
    "bgscale photon_excess / scale": (
        lambda x: PoissonBackgroundScale(jnp.array([1.0, 1.0]).at[1].set(x)).photon_excess(3.0, 1.3, 0.4, jnp.int32(1)), 1.6),
    "bgscale log_prob of the background / scale": (
        lambda x: (lambda lik: lik.log_prob(2.0, lik.background_mean(0.4, jnp.int32(1)), jnp.int32(1)))(
            PoissonBackgroundScale(jnp.array([1.0, 1.0]).at[1].set(x))), 1.6),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_central_differences(name):
    f, x = GRAD_CASES[name]
    x = jnp.asarray(x, jnp.float64)
    grad = float(jax.grad(f)(x))
    fd = _central_difference(lambda v: float(f(jnp.asarray(v, jnp.float64))), float(x), 1e-5 * float(x))
    assert grad == pytest.approx(fd, rel=1e-5, abs=1e-9), (grad, fd)


def test_gradients_finite_at_zero_signal_and_zero_count():
    def total(params, count, bragg):
        nb = NegativeBinomial(params["r"])
        bg = PoissonBackgroundScale(params["scale"])
        b = params["background"]
        return sum(
            jnp.sum(term)
            for lik in (nb, bg, Poisson())
            for term in (
                lik.photon_excess(count, bragg, b),
                lik.zero_term(bragg, b),
                lik.log_prob(count, lik.background_mean(b) + bragg),
                Likelihood.photon_excess(lik, count, bragg, b),
                Likelihood.zero_term(lik, bragg, b),
            )
        )

    params = {"r": jnp.asarray(3.0), "scale": jnp.asarray(1.2), "background": jnp.array([0.1, 0.1, 2.0])}
    count = jnp.array([0.0, 1.0, 0.0])
    bragg = jnp.array([0.0, 0.0, 0.0])
    grads, g_bragg = jax.jit(jax.grad(total, argnums=(0, 2)))(params, count, bragg)
    for leaf in jax.tree_util.tree_leaves((grads, g_bragg)):
        assert np.all(np.isfinite(np.asarray(leaf))), (grads, g_bragg)
    # d zero_term / d bragg at bragg = 0 is -r / (r + b) for NB and -1 for Poisson.
    g = jax.grad(lambda s: NegativeBinomial(jnp.asarray(3.0)).zero_term(s, 0.5))(0.0)
    assert float(g) == pytest.approx(-3.0 / 3.5)


# ---------------------------------------------------------------------------------------------- sampling
N_DRAWS = 60_000  # one shape for every sampling test (one compilation per sampler)


def _assert_moments(draws: np.ndarray, mean: float, variance: float):
    n = draws.size
    assert abs(draws.mean() - mean) <= 5 * np.sqrt(variance / n), (draws.mean(), mean)
    centred = (draws - draws.mean()) ** 2
    assert abs(centred.mean() - variance) <= 5 * centred.std() / np.sqrt(n), (centred.mean(), variance)


@pytest.mark.parametrize("mean", [0.05, 5.0])
def test_sample_moments(mean):
    """Poisson: variance = mean; negative binomial: mean + mean^2 / r, here with one r per frame."""
    draws = np.asarray(Poisson().sample(jax.random.key(3), jnp.full(N_DRAWS, mean)))
    assert draws.dtype == np.int32 and draws.min() >= 0
    _assert_moments(draws, mean, mean)

    half = N_DRAWS // 2
    lik = NegativeBinomial(jnp.array([2.0, 40.0]))
    frame = jnp.repeat(jnp.arange(2, dtype=jnp.int32), half)
    draws = np.asarray(lik.sample(jax.random.key(5), jnp.full(N_DRAWS, mean), frame))
    assert draws.dtype == np.int32 and draws.min() >= 0
    _assert_moments(draws[:half], mean, mean + mean**2 / 2.0)
    _assert_moments(draws[half:], mean, mean + mean**2 / 40.0)
    np.testing.assert_array_equal(draws, np.asarray(lik.sample(jax.random.key(5), jnp.full(N_DRAWS, mean), frame)))


# ---------------------------------------------------------------------------------------------- JAX
def test_pytree_leaves_are_the_parameters():
    assert jax.tree_util.tree_leaves(Poisson()) == []
    nb = NegativeBinomial(jnp.asarray(7.0))
    leaves, treedef = jax.tree_util.tree_flatten(nb)
    assert len(leaves) == 1 and float(leaves[0]) == 7.0
    assert jax.tree_util.tree_unflatten(treedef, [jnp.asarray(9.0)]) == NegativeBinomial(9.0)
    scale = jnp.array([1.0, 2.0, 3.0])
    assert jax.tree_util.tree_leaves(PoissonBackgroundScale(scale))[0] is scale
    # grad with respect to the object gives an object of gradients
    g = jax.grad(lambda lik: lik.zero_term(1.0, 0.5))(nb)
    assert isinstance(g, NegativeBinomial) and np.isfinite(float(g.dispersion))


def test_vmap_over_dispersion_and_jit_without_retracing():
    def excess(lik, count, bragg, background):
        return lik.photon_excess(count, bragg, background) + lik.zero_term(bragg, background)

    count, bragg, background, _ = random_inputs(4, n=50)
    two = NegativeBinomial(jnp.array([2.0, 30.0]))
    batched = jax.vmap(excess, in_axes=(0, None, None, None))(two, count, bragg, background)
    assert batched.shape == (2, 50)
    for i, r in enumerate([2.0, 30.0]):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(excess(NegativeBinomial(jnp.asarray(r)), count, bragg, background)), rtol=1e-12)

    traces = []

    @jax.jit
    def jitted(lik, bragg):
        traces.append(1)
        return excess(lik, count, bragg, background)

    a = jitted(NegativeBinomial(jnp.asarray(2.0)), bragg)
    b = jitted(NegativeBinomial(jnp.asarray(30.0)), bragg + 1.0)  # new parameter and data, same shapes
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(a), np.asarray(batched[0]), rtol=1e-12)
    assert not np.allclose(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------- registry
def test_registry_builds_checks_and_extends():
    assert set(LIKELIHOODS) >= {"poisson", "poisson-bgscale", "negbin"}
    assert make_likelihood("poisson") == Poisson()
    assert float(make_likelihood("negbin", dispersion=25.0).dispersion) == 25.0
    per_frame = make_likelihood("poisson-bgscale", background_scale=1.5, n_frames=4)
    np.testing.assert_array_equal(np.asarray(per_frame.scale), [1.5] * 4)
    with pytest.raises(ConfigError, match="choose one of negbin, poisson, poisson-bgscale"):
        make_likelihood("gauss")
    with pytest.raises(ConfigError, match="it takes: dispersion"):
        make_likelihood("negbin", scale=2.0)
    with pytest.raises(ConfigError, match="dispersion must be a finite number > 0"):
        make_likelihood("negbin", dispersion=0.0)
    with pytest.raises(ConfigError, match="expected one per frame"):
        make_likelihood("poisson-bgscale", background_scale=[1.0, 2.0], n_frames=3)
    with pytest.raises(ConfigError, match="background_scale must be"):
        LikelihoodConfig(name="poisson-bgscale", background_scale=float("nan"))
    with pytest.raises(ConfigError, match="unknown name 'nb'"):
        LikelihoodConfig(name="nb")
    with pytest.raises(ConfigError, match="already registered"):
        register_likelihood("poisson", lambda: Poisson())

    register_likelihood("negbin-fixed", lambda n_frames: NegativeBinomial(jnp.full(n_frames, 9.0)))
    try:
        built = LikelihoodConfig(name="negbin-fixed").build(n_frames=3)
        np.testing.assert_array_equal(np.asarray(built.dispersion), [9.0, 9.0, 9.0])
    finally:
        del LIKELIHOODS["negbin-fixed"]


def test_config_from_the_command_line():
    config = tyro.cli(LikelihoodConfig, args=["--name", "negbin", "--dispersion", "12.5"])
    lik = config.build(n_frames=10)
    assert isinstance(lik, NegativeBinomial) and float(lik.dispersion) == 12.5
    scaled = tyro.cli(LikelihoodConfig, args=["--name", "poisson-bgscale", "--background-scale", "0.8"]).build(n_frames=3)
    np.testing.assert_allclose(np.asarray(scaled.scale), [0.8, 0.8, 0.8])
    assert isinstance(LikelihoodConfig().build(5), Poisson)


# ---------------------------------------------------------------------------------------------- docs
def test_research_doc_likelihood_code_runs():
    """Every python block of docs/RESEARCH.md's likelihood section runs as shown (in one namespace)."""
    text = (ROOT / "docs" / "RESEARCH.md").read_text()
    section = text.split("## How to write a likelihood", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    before = dict(LIKELIHOODS)
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, "docs/RESEARCH.md", "exec"), namespace)
    finally:
        LIKELIHOODS.clear()
        LIKELIHOODS.update(before)
    # The toy model is at most 40 lines (the acceptance) and its pmf is normalised.
    definition = blocks[0]
    assert len(definition.strip().splitlines()) < 40
    lik = namespace["lik"]
    total = jnp.exp(jax.vmap(lambda k: lik.log_prob(k, 2.5))(jnp.arange(80.0))).sum()
    assert float(total) == pytest.approx(1.0, abs=1e-10)
