"""The post-processing commands end to end on a small simulated data set with blank and two-crystal frames:
reject, lowres --frame-weights, halves (lowres --half a and b, then resolution) and export (the README's
commands, run through their command-line entry points), and their errors."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import os
import pathlib
import re
import shlex
import shutil

import h5py
import numpy as np
import pytest

from emcjax import lowres, resolution, runio, simulate, toml_config
from emcjax.data import SparseDataset
from emcjax.merge import halves
from emcjax.mtz import read_mtz

from clitest import cli_error

N_FRAMES = 240
ROOT = pathlib.Path(__file__).resolve().parents[1]
# appended to the README's lines: a small detector (8 Å, 64 x 64 pixels), few frames and iterations
SMALL = {
    "emcjax.simulate": [
        "--n-frames", str(N_FRAMES), "--rotation-n", "3", "--bragg-photons", "300", "--seed", "5",
        "--geometry.num-rows", "64", "--geometry.num-cols", "64", "--geometry.pixel-size-m", "3.6e-3",
        "--geometry.beam-center-px", "31.5", "31.5", "--geometry.resolution-max-A", "8", "--geometry.n-shells", "10",
    ],
    "emcjax.lowres": ["--iters", "3", "--emc.rotation-n", "3", "--keep-checkpoints", "1"],
    "emcjax.halves": ["--n-shells", "4"],  # the halves take runs/all's settings (its config.toml)
}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"After a reconstruction.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    return [shlex.split(line.split("  #")[0]) for line in block.strip().splitlines()]


def _cc_true(run: pathlib.Path) -> float:
    return runio.read_metrics(run)[-1]["cc_true"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Runs the README's post-processing commands in order (through each module's main)."""
    root = tmp_path_factory.mktemp("merge")
    old = os.getcwd()
    os.chdir(root)
    try:
        commands = readme_commands()
        assert [c[2] for c in commands] == [
            "emcjax.simulate", "emcjax.lowres", "emcjax.reject", "emcjax.lowres", "emcjax.halves", "emcjax.export",
        ]
        for argv in commands:
            assert argv[:2] == ["python", "-m"]
            importlib.import_module(argv[2]).main(argv[3:] + SMALL.get(argv[2], []))
    finally:
        os.chdir(old)
    runs = {name: root / "runs" / name for name in ("all", "kept")}
    runs.update(A=root / "runs/halves/a", B=root / "runs/halves/b", merged=root / "runs/halves/merged")
    return root, root / "bad.h5", runs


def test_rejection_catches_blank_and_two_crystal_frames(pipeline, capsys):
    root, data, runs = pipeline
    with SparseDataset(data) as ds:
        kind = ds.read_truth()["frame_kind"]
    with h5py.File(runs["all"] / "rejection.h5") as f:
        flags, weights = f["flags"][()], f["weights"][()]
    bad = kind != 0
    assert np.mean(flags[bad] != 0) >= 0.95
    assert np.mean(flags[~bad] != 0) < 0.02
    np.testing.assert_array_equal(weights, (flags == 0).astype(np.float32))
    # EMC already gives these frames little weight (blank frames' phi -> ~0.01; a two-crystal frame is fitted by
    # its dominant crystal, the other's photons mostly fall outside the predicted peaks), so leaving them out
    # changes cc_true little (docs/BENCHMARKS.md); it must not lose more than the 10 % of frames' information
    assert _cc_true(runs["kept"]) > _cc_true(runs["all"]) - 0.01


def test_reject_drop_sets_weight_zero_only_for_the_chosen_reasons(pipeline, capsys):
    from emcjax import reject
    from emcjax.merge.reject import REASONS

    root, data, runs = pipeline
    run = root / "runs" / "all_drop"  # next to runs/all: its data set path is relative to root
    shutil.copytree(runs["all"], run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "rejection.h5").unlink()
    reject.main(["--run", str(run), "--drop", "phi_zero"])
    with h5py.File(run / "rejection.h5") as f:
        flags, weights = f["flags"][()], f["weights"][()]
    with SparseDataset(data) as ds:
        kind = ds.read_truth()["frame_kind"]
    blank = (flags & REASONS["phi_zero"]) != 0
    np.testing.assert_array_equal(weights, (~blank).astype(np.float32))
    assert np.all(blank[kind == 1]) and np.any((flags != 0) & ~blank)  # blank frames out, other flags kept in
    assert "weight 0 (reasons phi_zero)" in capsys.readouterr().out
    # the pipeline's [reject] drop setting reaches the same command: the same weights
    from emcjax import pipeline, pipeline_stages

    (run / "rejection.h5").unlink()
    config = pipeline.parse_args(["--data", str(data), "--reject.drop", "phi_zero"])
    stage = pipeline_stages._reject_stage(config, run, [])
    stage.call(False, print)
    with h5py.File(run / "rejection.h5") as f:
        np.testing.assert_array_equal(f["weights"][()], weights)
        assert f.attrs["drop"] == "phi_zero"


def test_second_crystal_test_refines_the_first_crystal_only_for_the_frames_it_would_flag(pipeline, capsys):
    """reject computes the second-crystal evidence with the grid rotation, then again, with the first crystal
    refined off the grid, for the frames that would be flagged: the others keep their value, flags only go.
    (Here the true orientations are on the grid: the refinement keeps them, experiments/second_evidence.py has
    continuous ones.)"""
    from emcjax import reject
    from emcjax.merge.reject import REASONS

    root, data, runs = pipeline
    values = {}
    for step in (0.0, 0.5):
        run = root / "runs" / f"all_refine{step}"
        shutil.copytree(runs["all"], run, ignore=shutil.ignore_patterns("checkpoints", "rejection.h5"))
        capsys.readouterr()
        reject.main(["--run", str(run), "--criteria.evidence-refine-step", str(step)])
        printed = capsys.readouterr().out
        with h5py.File(run / "rejection.h5") as f:
            values[step] = f["second_evidence"][()], f["flags"][()], f.attrs["evidence_refine_step"]
    (grid, grid_flags, s0), (refined, refined_flags, s1) = values[0.0], values[0.5]
    assert (s0, s1) == (0.0, 0.5)
    again = grid > 0
    assert again.any() and f"{int(again.sum())} with the first crystal refined" in printed
    np.testing.assert_array_equal(refined[~again], grid[~again])
    bit = REASONS["second_crystal"]
    assert np.all((refined_flags & bit) <= (grid_flags & bit))


def test_halves_are_disjoint_independent_and_recorded(pipeline):
    root, data, runs = pipeline
    w = {h.lower(): h5py.File(runs[h] / "frame_weights.h5")["weights"][()] for h in "AB"}
    rejected = h5py.File(runs["all"] / "rejection.h5")["weights"][()] == 0
    assert not np.any((w["a"] > 0) & (w["b"] > 0))
    np.testing.assert_array_equal((w["a"] > 0) | (w["b"] > 0), ~rejected)
    np.testing.assert_array_equal(w["a"] > 0, (np.arange(N_FRAMES) % 2 == 0) & ~rejected)
    attrs = {h.lower(): dict(h5py.File(runs[h] / "frame_weights.h5").attrs) for h in "AB"}
    assert attrs["a"]["half"] == "a" and attrs["a"]["split"] == "parity"
    assert attrs["a"]["init_seed"] != attrs["b"]["init_seed"]
    # the two halves' random starts differ: their first-iteration models are not proportional
    first = [runio.read_iteration(runs[h], 1)["intensity"].ravel() for h in "AB"]
    assert np.corrcoef(*first)[0, 1] < 0.999


def test_split_is_deterministic_and_balanced():
    for method in ("parity", "random"):
        a = halves.split_frames(101, method, seed=3)
        np.testing.assert_array_equal(a, halves.split_frames(101, method, seed=3))
        assert np.sum(a == 0) == 51 and np.sum(a == 1) == 50
    assert not np.array_equal(halves.split_frames(100, "random", 1), halves.split_frames(100, "random", 2))
    assert halves.half_seed(0, "a") != halves.half_seed(0, "b")


def test_resolution_writes_table_and_merged_intensities(pipeline):
    root, data, runs = pipeline
    merged = resolution.read_merged(runs["merged"])
    rows = list(csv.DictReader((runs["merged"] / "merging_stats.csv").open()))
    assert len(rows) == 5 and rows[-1]["shell"] == "overall"
    assert (runs["merged"] / "figures" / "merging.png").stat().st_size > 0
    table = (runs["merged"] / "merging_table.txt").read_text()
    assert "cc_half" in table and "cc_true" in table and "suggested" in table
    # (CC* against the true correlation is checked on synthetic halves in test_merge_stats and on the 4 Å
    # benchmark in experiments/merging.py: on this 8 Å toy both halves share systematic errors, CC* > cc_true)
    for r in rows[:-1]:
        assert float(r["cc_star"]) == pytest.approx(np.sqrt(2 * float(r["cc_half"]) / (1 + float(r["cc_half"]))))
        assert float(r["cc_true"]) > 0.5
    assert np.all(merged["sigma"] > 0) and np.all(merged["n_obs"] > 0)
    np.testing.assert_allclose(merged["intensity"], 0.5 * (merged["half_a"] + merged["half_b"]))


def test_mtz_reads_back_and_correlates_with_the_truth_like_the_model(pipeline):
    root, data, runs = pipeline
    mtz = read_mtz(runs["merged"] / "merged.mtz")
    merged = resolution.read_merged(runs["merged"])
    assert mtz["space_group"] == "P 43 21 2"
    np.testing.assert_allclose(mtz["cell"], (79.1, 79.1, 37.9, 90, 90, 90), rtol=1e-6)
    assert {"H", "K", "L", "IMEAN", "SIGIMEAN", "I_half1", "I_half2"} <= set(mtz)
    with SparseDataset(data) as ds:
        truth = ds.read_truth()
    key = {tuple(h): i for i, h in enumerate(truth["hkl"].tolist())}
    true_i = truth["intensity"].sum(axis=1)
    hkl = np.stack([mtz["H"], mtz["K"], mtz["L"]], axis=1).astype(int)
    cc_mtz = np.corrcoef(mtz["IMEAN"], true_i[[key[tuple(h)] for h in hkl.tolist()]])[0, 1]
    cc_model = np.corrcoef(merged["intensity"], true_i[[key[tuple(h)] for h in merged["hkl"].tolist()]])[0, 1]
    assert hkl.shape[0] == merged["hkl"].shape[0] and cc_mtz == pytest.approx(cc_model, abs=1e-4)
    assert (runs["merged"] / "merged.hkl").read_text().count("\n") == hkl.shape[0] + 2


def _half_of_other_data(tmp_path: pathlib.Path, half: pathlib.Path, name: str, *simulate_args: str) -> pathlib.Path:
    """A copy of run ``half`` pointed at a data set simulated with ``simulate_args`` (another cell, group)."""
    other = tmp_path / f"{name}.h5"
    simulate.main(["--out", str(other), *simulate_args, *SMALL["emcjax.simulate"]])
    fake = tmp_path / name
    fake.mkdir()
    config = toml_config.config_from_toml(lowres.LowresConfig, half / "config.toml")
    toml_config.save_config(fake / "config.toml", dataclasses.replace(config, data=other))
    for entry in ("intensities.h5", "iterations"):
        (fake / entry).symlink_to((half / entry).resolve())
    return fake


def _cli_error(module: str, *args: str, capsys) -> str:
    """``python -m MODULE ARGS`` through the command's main in this process: the commands' shared error path
    (emcjax.cli) exits with status 2 and one line 'error: ...', no traceback (clitest.cli_error); that line."""
    return cli_error(importlib.import_module(module).main, list(args), capsys)


def test_mismatched_halves_and_missing_results_give_one_clear_error(pipeline, tmp_path, capsys):
    root, data, runs = pipeline
    # "half b" runs made from data sets with another cell, and with another space group of the same Laue
    # group and reflections (P 41 21 2, the enantiomorph)
    other_cell = _half_of_other_data(tmp_path, runs["B"], "other_cell", "--cell", "70", "70", "40", "90", "90", "90")
    other_group = _half_of_other_data(tmp_path, runs["B"], "other_group", "--space-group", "P 41 21 2")
    error = _cli_error("emcjax.resolution", "--half-a", str(runs["A"]), "--half-b", str(other_cell), "--out",
                       str(tmp_path / "m"), capsys=capsys)
    assert "different cells" in error or "does not match" in error, error
    error = _cli_error("emcjax.resolution", "--half-a", str(runs["A"]), "--half-b", str(other_group), "--out",
                       str(tmp_path / "m"), capsys=capsys)
    assert re.search("different space groups: .* P 43 21 2 vs .* P 41 21 2", error), error
    # a run directory without results
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.toml").write_text((runs["A"] / "config.toml").read_text())
    for args in (("emcjax.reject", "--run", str(empty)), ("emcjax.resolution", "--half-a", str(empty), "--half-b", str(runs["B"]))):
        error = _cli_error(*args, capsys=capsys)
        assert "has not finished" in error, error
    error = _cli_error("emcjax.halves", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "h"), capsys=capsys)
    assert "neither a run directory" in error and not (tmp_path / "h").exists()
    error = _cli_error("emcjax.export", "--run", str(runs["A"]), capsys=capsys)
    assert "no merged.h5" in error, error
    assert not (tmp_path / "m").exists()


def test_half_sets_of_other_cells_or_space_groups_are_refused(pipeline):
    from emcjax.crystal import Crystal
    from emcjax.errors import ConfigError
    from emcjax.merge.rundata import load_run

    root, data, runs = pipeline
    a, b = load_run(runs["A"]), load_run(runs["B"])
    resolution._check_pair(a, b)  # the real pair passes
    other_cell = dataclasses.replace(b, crystal=Crystal((79.1, 79.1, 38.5, 90, 90, 90), "P 43 21 2"))
    with pytest.raises(ConfigError, match="different cells"):
        resolution._check_pair(a, other_cell)
    other_group = dataclasses.replace(b, crystal=Crystal((79.1, 79.1, 37.9, 90, 90, 90), "P 41 21 2"))
    with pytest.raises(ConfigError, match="different space groups: .* P 43 21 2 vs .* P 41 21 2"):
        resolution._check_pair(a, other_group)
    # a truth that lacks some of the model's reflections: NaN for those, the truth's values for the others
    truth = dict(a.truth)
    full = resolution._true_integrated(a)
    truth["hkl"], truth["intensity"] = np.asarray(truth["hkl"])[5:], np.asarray(truth["intensity"])[5:]
    partial = resolution._true_integrated(dataclasses.replace(a, truth=truth))
    removed = {tuple(h) for h in np.asarray(a.truth["hkl"])[:5].tolist()}
    lacks = np.array([tuple(h) in removed for h in a.result.hkl.tolist()])
    assert lacks.sum() == 5 and np.isnan(partial[lacks]).all() and np.isfinite(full).all()
    np.testing.assert_array_equal(partial[~lacks], full[~lacks])


def test_halves_command_takes_the_runs_settings_and_refuses_a_used_out(pipeline, tmp_path):
    from emcjax import halves as halves_cli
    from emcjax.errors import ConfigError

    root, data, runs = pipeline
    config = halves_cli.HalvesConfig(run=runs["all"], out=tmp_path / "h", frame_weights=runs["all"] / "rejection.h5")
    base = halves_cli.base_config(config)
    saved = toml_config.config_from_toml(lowres.LowresConfig, runs["all"] / "config.toml")
    assert base.iters == saved.iters == 3 and base.emc == saved.emc and base.data == saved.data
    assert base.frame_weights == runs["all"] / "rejection.h5" and base.half is None
    # both halves ran with these settings: their recorded configs differ only in out and half
    for h, name in (("a", "A"), ("b", "B")):
        half = toml_config.config_from_toml(lowres.LowresConfig, runs[name] / "config.toml")
        assert half == dataclasses.replace(base, out=half.out, half=h) and half.out.name == h
    assert halves_cli.base_config(dataclasses.replace(config, iters=7, split="random")).split == "random"
    (tmp_path / "h" / "b").mkdir(parents=True)
    (tmp_path / "h" / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files"):
        halves_cli.run_halves(base, tmp_path / "h", log=lambda *a: None)
    assert not (tmp_path / "h" / "a").exists()  # refused before any work
    with pytest.raises(ConfigError, match="runs both halves"):
        halves_cli.run_halves(dataclasses.replace(base, half="a"), tmp_path / "h2", log=lambda *a: None)
    # --resume on the finished halves (frame weights given relative to the run's directory) leaves them as
    # they are and merges again
    before = {h: runio.read_run(runs[h]).intensity for h in "AB"}
    old = os.getcwd()
    os.chdir(root)
    try:
        relative = dataclasses.replace(config, out=pathlib.Path("runs/halves"), resume=True, n_shells=4,
                                       frame_weights=pathlib.Path("runs/all/rejection.h5"))
        summary = halves_cli.run(relative, log=lambda *a: None)
    finally:
        os.chdir(old)
    for h in "AB":
        np.testing.assert_array_equal(runio.read_run(runs[h]).intensity, before[h])
        assert runio.read_metrics(runs[h])[-1]["iteration"] == 3
    assert summary["merged"]["stats"].n_shells == 4 and summary["runs"]["merged"] == pathlib.Path("runs/halves/merged")
