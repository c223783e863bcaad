"""Test-session settings: one JAX persistent compilation cache shared by the session's processes.

Most of the suite's time is XLA compilation, and many tests compile the same computations (the same small
problem's set-up and step, every ``python -m emcjax.*`` subprocess compiling what an earlier test compiled).
The xdist workers and the subprocesses they start (which inherit the environment) share one cache directory,
fresh for each session and removed at its end, so that nothing is reused between sessions. Only compilation
is skipped: every test still runs the same executables on its own data.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import uuid

import pytest

CACHE_SETTINGS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _cache_dir(uid: str) -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / f"emcjax-test-jax-cache-{uid}"


def pytest_configure(config):
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        uid = worker["testrunuid"]
    else:  # the xdist controller (it starts the workers with this id) or a run without xdist
        if getattr(config.option, "testrunuid", None) is None and hasattr(config.option, "testrunuid"):
            config.option.testrunuid = uuid.uuid4().hex
        uid = getattr(config.option, "testrunuid", None) or uuid.uuid4().hex
        config._emcjax_cache_dir = _cache_dir(uid)
    settings = {"JAX_COMPILATION_CACHE_DIR": str(_cache_dir(uid)), **CACHE_SETTINGS}
    os.environ.update(settings)
    if "jax" in sys.modules:  # imported before this hook: the environment was read already
        import jax

        jax.config.update("jax_compilation_cache_dir", settings["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    path = getattr(config, "_emcjax_cache_dir", None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


# The suite runs with ``--dist loadfile`` (pyproject addopts): each file on one worker, so that its module
# fixtures and compiled steps are built once. The files that take longest go first, so that no long file
# starts last while the other worker idles (longest-first scheduling); the rest keep their order.
SLOW_FILES = ["test_tutorial.py", "test_experiments_research.py", "test_core.py", "test_refinement.py",
              "test_rundir.py", "test_candidates.py", "test_research_model.py", "test_emc.py", "test_pipeline.py",
              "test_refinement_resume.py"]


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))

