"""From detector images to the sparse data set and candidate orientations.

``images`` (CBF / HDF5 readers and writers), ``mask`` (static mask), ``background`` (radial background,
outliers, rings), ``spots`` (spot finding), ``writer`` (streaming sparse writer), ``reduce`` (the reduction
runner), ``orient`` (candidate orientations in JAX), ``simulate_images`` (dense simulated images).
Runners: ``python -m emcjax.reduce``, ``python -m emcjax.orient``, ``python -m emcjax.simulate_images``.
"""
