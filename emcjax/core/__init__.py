"""The pure EMC core: arrays in, arrays out, jittable, vmappable and differentiable.

* :mod:`emcjax.core.arrays`: the pytrees (shared rotation-set arrays, a block of frames, kept pairs, state);
* :mod:`emcjax.core.estep`: per-rotation tables, log-likelihood of (frame, candidate) pairs, responsibilities;
* :mod:`emcjax.core.kept`: responsibilities -> kept pairs, selected and gathered on the device;
* :mod:`emcjax.core.mstep`: closed-form Poisson updates (per-pixel ML + compress, MLEM, phi);
* :mod:`emcjax.core.gradient`: a gradient-based M-step (optax) for any likelihood;
* :mod:`emcjax.core.step`: ``init`` / ``update`` of one whole iteration (optax / jax-md shape).

Nothing here reads files, builds joins or talks to the host; planning (set-up, blocks, sharding) lives in
:mod:`emcjax.problem` and :mod:`emcjax.emc`.
"""
