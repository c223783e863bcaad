"""The low-resolution runner end to end on a tiny demo data set: outputs, resume, config files, init-from."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import h5py
import numpy as np
import pytest

from emcjax import emc, lowres, runio, toml_config
from emcjax.errors import ConfigError, DataError

from clitest import cli_error

# grid orientations searched in full, no refinement, all iterations: the runner's behaviour, fast
TINY_DEMO = lowres.DemoConfig(n_frames=60, rotation_n=2, bragg_photons=300.0, candidates=0, refine=False,
                              stop_model_change=0.0)
TINY_EMC = emc.EMCConfig(rotation_n=2)


@pytest.fixture(scope="module", autouse=True)
def demo_cache(tmp_path_factory):
    """Caches the tiny demo data set in a temporary directory for the whole module."""
    old = os.environ.get("EMCJAX_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["EMCJAX_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["EMCJAX_CACHE"]
    else:
        os.environ["EMCJAX_CACHE"] = old


def tiny(out: pathlib.Path, **kw) -> lowres.LowresConfig:
    return lowres.LowresConfig(out=out, demo=TINY_DEMO, emc=TINY_EMC, **kw)


def run_quiet(config: lowres.LowresConfig) -> tuple[dict, list[str]]:
    lines: list[str] = []
    return lowres.run(config, log=lines.append), lines


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """One finished 2-iteration run shared by the output and init-from tests."""
    out = tmp_path_factory.mktemp("run") / "two"
    config = tiny(out, iters=2, keep_checkpoints=1)
    final, lines = run_quiet(config)
    return config, final, lines


def test_run_writes_all_outputs(two_iterations, demo_cache):
    config, final, lines = two_iterations
    out = config.out
    # metrics.jsonl: one line per iteration with the required keys (the data carry truth: cc_true)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    for r in records:
        assert {"iteration", "log_likelihood", "seconds", "cc_true"} <= set(r)
        assert np.isfinite(r["log_likelihood"])
    assert final["iteration"] == 2 and final["cc_true"] == records[-1]["cc_true"]
    # progress lines name every iteration with total, ETA and cc_true
    progress = [line for line in lines if line.startswith("iter ")]
    assert len(progress) == 2 and "2/2" in progress[-1] and "ETA" in progress[-1] and "cc_true" in progress[-1]
    assert any("demo.n_frames=60" in line for line in lines)  # differences from the defaults are logged
    # iterations/NNN.h5
    final_run = runio.read_run(out)
    n_asu, n_vox = final_run.intensity.shape
    for it in (1, 2):
        with h5py.File(out / "iterations" / f"{it:03d}.h5", "r") as f:
            assert f.attrs["iteration"] == it
            assert f["intensity"].shape == (n_asu, n_vox) and f["intensity"].dtype == np.float32
            assert f["phi"].shape == (60,)
            assert f["best_rotation"].shape == (60,) and f["best_rotation"].dtype == np.int64
            assert f["best_probability"].shape == (60,)
    last = runio.read_iteration(out, 2)
    np.testing.assert_array_equal(last["intensity"], final_run.intensity)
    # intensities.h5: model, unique hkl, integrated per hkl, phi
    assert final_run.hkl.shape == (n_asu, 3) and final_run.integrated.shape == (n_asu,)
    np.testing.assert_allclose(final_run.integrated, final_run.intensity.sum(axis=1), rtol=1e-5)
    assert final_run.phi.shape == (60,) and np.all(np.isfinite(final_run.phi))
    # figures
    for name in ("convergence.png", "sections.png", "cc_true.png"):
        png = out / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoints: keep_checkpoints=1 keeps only the last step
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    # config.toml round-trips to the resolved config
    saved = toml_config.config_from_toml(lowres.LowresConfig, out / "config.toml")
    assert saved == dataclasses.replace(config, config=None, resume=False)
    # the demo data set was cached, and a second look-up reuses it
    assert lowres.demo_path(TINY_DEMO).parent == demo_cache and lowres.demo_path(TINY_DEMO).exists()
    reuse: list[str] = []
    assert lowres.ensure_demo(TINY_DEMO, log=reuse.append) == lowres.demo_path(TINY_DEMO)
    assert "cached" in reuse[0]
    # no temporary files left behind by the atomic writes
    assert not [p for p in out.rglob(".*.tmp")]


def test_toml_round_trip_of_nondefault_config(tmp_path):
    config = lowres.LowresConfig(
        iters=7,
        data=pathlib.Path("some dir/data \"x\".h5"),
        out=tmp_path / "o",
        init_from=pathlib.Path("runs/a"),
        seed=3,
        emc=emc.EMCConfig(rotation_n=3, gw=2.5, d_min=5.0, intensity_update="reference", update_phi=False,
                          prune_min=1e-7),
        demo=lowres.DemoConfig(n_frames=17, bragg_photons=1e3),
    )
    toml_config.save_config(tmp_path / "c.toml", config)
    assert toml_config.config_from_toml(lowres.LowresConfig, tmp_path / "c.toml") == config
    # None fields are left out of the file and come back as None (their default)
    toml_config.save_config(tmp_path / "d.toml", lowres.LowresConfig())
    assert toml_config.config_from_toml(lowres.LowresConfig, tmp_path / "d.toml") == lowres.LowresConfig()


def test_config_file_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("iters = 3\n[emc]\nrotation_nn = 2\n")
    with pytest.raises(ConfigError, match="emc.rotation_nn"):
        toml_config.config_from_toml(lowres.LowresConfig, bad)
    bad.write_text("iters = \"many\"\n")
    with pytest.raises(ConfigError, match="iters"):
        toml_config.config_from_toml(lowres.LowresConfig, bad)
    bad.write_text("nope = 1\n")
    assert "unknown config key 'nope'" in cli_error(lowres.main, ["--config", str(bad)], capsys)


def test_config_file_gives_defaults_and_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        "iters = 5\nseed = 11\nout = \"from-file\"\n"
        "[emc]\nrotation_n = 2\ngw = 3\n"
        "[demo]\nn_frames = 60\n"
    )
    config = lowres.parse_args(["--config", str(path), "--seed", "7", "--emc.no-update-phi"])
    assert config.iters == 5 and config.out == pathlib.Path("from-file")
    assert config.seed == 7  # the flag wins
    assert config.emc.rotation_n == 2 and config.emc.gw == 3.0 and config.emc.update_phi is False
    assert config.demo.n_frames == 60 and config.demo.bragg_photons == lowres.DemoConfig().bragg_photons
    assert config.config == path
    config = lowres.parse_args([f"--config={path}", "--iters", "9"])
    assert config.iters == 9 and config.seed == 11


def test_help_shows_units(capsys):
    with pytest.raises(SystemExit) as exc:
        lowres.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--iters", "--data", "--out", "--resume", "--init-from", "--config", "--emc.rotation-n",
                 "--demo.n-frames"):
        assert flag in text
    assert "photons" in text


def test_resume_equals_uninterrupted_run(tmp_path):
    whole = tiny(tmp_path / "whole", iters=6)
    run_quiet(whole)
    part = tiny(tmp_path / "part", iters=3)
    run_quiet(part)
    # a run killed after writing metrics for an iteration it never checkpointed
    runio.append_metrics(part.out, {"iteration": 4, "log_likelihood": 0.0, "seconds": 0.0})
    final, lines = run_quiet(dataclasses.replace(part, iters=6, resume=True))
    assert any("resumed" in line and "iteration 3" in line for line in lines)
    assert final["iteration"] == 6
    a, b = runio.read_run(whole.out), runio.read_run(part.out)
    assert np.array_equal(a.intensity, b.intensity)
    assert np.array_equal(a.phi, b.phi)
    for it in (4, 5, 6):
        x, y = runio.read_iteration(whole.out, it), runio.read_iteration(part.out, it)
        assert np.array_equal(x["intensity"], y["intensity"]) and np.array_equal(x["phi"], y["phi"])
        assert np.array_equal(x["best_rotation"], y["best_rotation"])
    assert [r["iteration"] for r in runio.read_metrics(part.out)] == [1, 2, 3, 4, 5, 6]
    ll_a = [r["log_likelihood"] for r in runio.read_metrics(whole.out)]
    ll_b = [r["log_likelihood"] for r in runio.read_metrics(part.out)]
    assert ll_a == ll_b
    # resuming a finished run does nothing more and keeps the outputs
    final, _ = run_quiet(dataclasses.replace(part, iters=6, resume=True))
    assert final["iteration"] == 6 and len(runio.read_metrics(part.out)) == 6


def test_refuses_to_overwrite_nonempty_out(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    message = cli_error(lowres.main, ["--out", str(out), "--iters", "1", "--demo.n-frames", "60", "--demo.rotation-n", "2",
                         "--emc.rotation-n", "2"], capsys)
    assert str(out) in message and "--out" in message
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    # --resume on a directory without checkpoints is refused too, and leaves it alone
    with pytest.raises(ConfigError, match="resume"):
        lowres.run(tiny(out, iters=1, resume=True), log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_init_from_starts_from_the_other_runs_model(two_iterations, tmp_path):
    source = two_iterations[0].out
    # iters=0: the run's final model is its starting point
    final, lines = run_quiet(tiny(tmp_path / "init", iters=0, init_from=source))
    assert any("initial model and phi from" in line for line in lines)
    a, b = runio.read_run(source), runio.read_run(tmp_path / "init")
    np.testing.assert_array_equal(a.intensity, b.intensity)
    np.testing.assert_array_equal(a.phi, b.phi)
    # and it iterates from there: one iteration from the other run's model
    final, _ = run_quiet(tiny(tmp_path / "init1", iters=1, init_from=source))
    assert final["iteration"] == 1 and np.isfinite(final["log_likelihood"])


def test_init_from_checks_frames_and_model_shape(two_iterations, tmp_path):
    source = runio.read_run(two_iterations[0].out)
    wrong_phi = tmp_path / "wrong_phi"
    runio.write_intensities(wrong_phi, source.intensity, source.hkl, source.integrated, source.phi[:10])
    with pytest.raises(ConfigError, match="init_from: .*10 frames"):
        lowres.run(tiny(tmp_path / "a", iters=1, init_from=wrong_phi), log=lambda s: None)
    wrong_model = tmp_path / "wrong_model"
    runio.write_intensities(wrong_model, source.intensity[:, :5], source.hkl, source.integrated, source.phi)
    with pytest.raises(ConfigError, match="init_from: .*shape"):
        lowres.run(tiny(tmp_path / "b", iters=1, init_from=wrong_model), log=lambda s: None)
    with pytest.raises(DataError, match="does not exist"):
        lowres.run(tiny(tmp_path / "c", iters=1, init_from=tmp_path / "missing"), log=lambda s: None)


def test_resume_flag_reads_the_saved_config(tmp_path):
    out = tmp_path / "r"
    toml_config.save_config(out / "config.toml", tiny(out, iters=3, seed=4))
    config = lowres.parse_args(["--out", str(out), "--resume", "--iters", "8"])
    assert config.resume and config.iters == 8 and config.seed == 4
    assert config.demo == TINY_DEMO and config.emc == TINY_EMC


def test_sections_expand_with_laue_ops(tmp_path):
    from emcjax import figures
    from emcjax.crystal import Crystal

    hkl = np.array([[1, 2, 0], [3, 0, 1], [0, 0, 2]])
    ops = Crystal(cell=(79.1, 79.1, 37.9, 90.0, 90.0, 90.0), space_group="P 43 21 2").laue_ops
    for laue in (None, ops):
        png = figures.plot_sections(hkl, np.array([10.0, 0.0, 5.0]), tmp_path / "s.png", laue)
        assert png.read_bytes()[:4] == b"\x89PNG"
    png = figures.plot_convergence([], tmp_path / "c.png")  # no iterations yet: still a figure
    assert png.exists()


@pytest.mark.parametrize("problem", ["missing", "not_hdf5", "truncated", "d_min"])
def test_bad_input_gives_one_error_and_writes_nothing(tmp_path, problem, capsys):
    """A missing, corrupt or truncated data set, or a config that contradicts it: one error line naming the
    file or field, a non-zero exit, and no run directory."""
    data = tmp_path / "data.h5"
    flags = []
    if problem == "not_hdf5":
        data.write_text("not an HDF5 file")
    elif problem in ("truncated", "d_min"):
        lowres.ensure_demo(TINY_DEMO, log=lambda _: None)
        source = lowres.demo_path(TINY_DEMO).read_bytes()
        data.write_bytes(source[: len(source) // 2] if problem == "truncated" else source)
        if problem == "d_min":
            flags = ["--emc.d-min", "1.0"]  # beyond the data set's 4 Å pixels
    out = tmp_path / "run"
    message = cli_error(lowres.main, ["--data", str(data), "--out", str(out), "--iters", "1", "--emc.rotation-n", "2", *flags],
                        capsys)
    assert ("d_min" in message) if problem == "d_min" else ("data.h5" in message)
    assert not out.exists()


def test_convergence_stop_ends_the_run_early(tmp_path):
    """demo.stop_model_change: the run stops after the first iteration whose model change is below it,
    writes that iteration's outputs and says so (here every change is below the tolerance)."""
    config = lowres.LowresConfig(out=tmp_path / "stop", iters=5, emc=TINY_EMC,
                                 demo=dataclasses.replace(TINY_DEMO, stop_model_change=1e9))
    final, lines = run_quiet(config)
    assert final["iteration"] == 1 and [r["iteration"] for r in runio.read_metrics(config.out)] == [1]
    assert (config.out / "iterations" / "001.h5").is_file() and (config.out / "intensities.h5").is_file()
    assert any(line.startswith("converged:") and "iteration 1 (of at most 5)" in line for line in lines)
    assert any(line.startswith("demo: 60 frames") and "no orientation refinement" in line for line in lines)
