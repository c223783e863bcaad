"""The run directory's life cycle (issue 15): locks, resume checks that change nothing, clean-up of failed
starts, checkpoints that survive damage and kills, one-line errors with exit status 2.

Every refusal is checked for its exit status (2), its one ``error:`` line and for leaving the earlier
results byte-identical. Processes (a second run on the same directory, kills, a full disk) are real
subprocesses; the rest calls the command's ``main`` in this process.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

from emcjax import atomic_files, checkpoint, emc, lowres, rundir, runio, simulate, toml_config
from emcjax.detector import DetectorGeometry

from clitest import cli_error, snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]
GEOMETRY = DetectorGeometry(num_rows=64, num_cols=64, pixel_size_m=3.6e-3, beam_center_px=(31.5, 31.5),
                            resolution_max_A=8.0, beamstop_radius_px=2.0, n_shells=20)
FLAGS = ["--emc.rotation-n", "2"]
TINY_EMC = emc.EMCConfig(rotation_n=2)


def simulate_tiny(path: pathlib.Path, n_frames: int = 40, seed: int = 0) -> pathlib.Path:
    return simulate.write(simulate.SimulationConfig(out=path, n_frames=n_frames, rotation_n=2, bragg_photons=200.0,
                                                    geometry=GEOMETRY, seed=seed))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The tiny data set, another of the same shape (other seed), and one with fewer frames."""
    root = tmp_path_factory.mktemp("data")
    return {"main": simulate_tiny(root / "d.h5"), "same_shape": simulate_tiny(root / "other.h5", seed=1),
            "fewer": simulate_tiny(root / "fewer.h5", n_frames=30)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the subprocesses: this worktree's emcjax, a shared JAX compilation cache, no buffering."""
    cache = tmp_path_factory.mktemp("jax-cache")
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def quiet_run(**kw) -> tuple[dict, list[str]]:
    lines: list[str] = []
    return lowres.run(lowres.LowresConfig(emc=TINY_EMC, **kw), log=lines.append), lines


@pytest.fixture(scope="module")
def reference(datasets, tmp_path_factory):
    """An uninterrupted 4-iteration run (iterations/NNN.h5 of every iteration)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    quiet_run(data=datasets["main"], out=out, iters=4)
    return out


@pytest.fixture(scope="module")
def finished(datasets, tmp_path_factory):
    """A finished 2-iteration run, started from the data set's directory with a relative --data."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cwd = os.getcwd()
    os.chdir(datasets["main"].parent)
    try:
        lowres.main(["--data", datasets["main"].name, "--out", str(out), "--iters", "2", *FLAGS])
    finally:
        os.chdir(cwd)
    return out


def copy_run(source: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def assert_same_arrays(a: pathlib.Path, b: pathlib.Path, iterations=()) -> None:
    x, y = runio.read_run(a), runio.read_run(b)
    assert np.array_equal(x.intensity, y.intensity) and np.array_equal(x.phi, y.phi)
    for it in iterations:
        p, q = runio.read_iteration(a, it), runio.read_iteration(b, it)
        for name in ("intensity", "phi", "best_rotation", "best_probability"):
            assert np.array_equal(p[name], q[name]), (it, name)


# ----------------------------------------------------------------------------------------------------
# 1, 9, 10: a refused --resume changes nothing; the run's data set is checked; paths are absolute


@pytest.mark.parametrize("case", ["vn", "gw", "seed", "fewer_frames", "same_shape_data", "config_deleted"])
def test_refused_resume_changes_nothing(case, finished, datasets, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    extra = {"vn": ["--emc.vn", "8"], "gw": ["--emc.gw", "3"], "seed": ["--seed", "5"],
             "fewer_frames": ["--data", str(datasets["fewer"])],
             "same_shape_data": ["--data", str(datasets["same_shape"])], "config_deleted": []}[case]
    if case == "config_deleted":
        (run / "config.toml").unlink()
    before = snapshot(run)
    message = cli_error(lowres.main, ["--out", str(run), "--resume", "--iters", "3", *extra], capsys)
    expected = {"vn": "emc.vn = 8 (the run has 10)", "gw": "emc.gw = 3.0 (the run has 2.0)",
                "seed": "seed = 5 (the run has 0)", "fewer_frames": "30 frames",
                "same_shape_data": "was made with data set", "config_deleted": "config.toml is missing"}[case]
    assert expected in message, message
    assert snapshot(run) == before
    if case == "vn":  # the run still resumes with its own settings, from another directory (absolute data)
        lowres.main(["--out", str(run), "--resume", "--iters", "3"])
        assert [r["iteration"] for r in runio.read_metrics(run)] == [1, 2, 3]
        saved = toml_config.config_from_toml(lowres.LowresConfig, run / "config.toml")
        assert saved.data.is_absolute() and saved.data == datasets["main"]


def test_init_from_on_another_data_set_is_refused(finished, datasets, tmp_path, capsys):
    message = cli_error(lowres.main, ["--data", str(datasets["same_shape"]), "--out", str(tmp_path / "new"),
                                      "--init-from", str(finished), "--iters", "1", *FLAGS], capsys)
    assert "init_from: run" in message and "was made with data set" in message
    assert not (tmp_path / "new").exists()


def test_provenance_records_the_start(finished, datasets):
    record = json.loads((finished / "run.json").read_text())
    assert record["data"] == rundir.data_identity(datasets["main"])
    start = record["starts"][-1]
    assert start["versions"]["jax"] and start["devices"] and "--iters" in start["command"]
    assert start["config"]["iters"] == 2 and start["resumed_at_iteration"] is None


# ----------------------------------------------------------------------------------------------------
# 2: two runs on one directory


def test_second_run_on_same_out_is_refused_and_first_completes(datasets, reference, env, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "emcjax.lowres", "--data", str(datasets["main"]), "--out", str(out), "--iters", "4",
            *FLAGS]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in first.stdout:  # the lock is taken before anything else: wait until the run is under way
        lines.append(line)
        if line.startswith("problem:"):
            break
    first.send_signal(signal.SIGSTOP)  # keep it holding the lock while the second one tries
    try:
        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    rest = first.communicate(timeout=120)[0]
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert f"is in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, "".join(lines) + rest
    assert_same_arrays(out, reference, iterations=(4,))
    assert [r["iteration"] for r in runio.read_metrics(out)] == [1, 2, 3, 4]
    assert not (out / rundir.LOCK_FILE).exists()


def test_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone"}))
    lines: list[str] = []
    with rundir.RunDirectory(out, log=lines.append) as rd:
        assert rd.status == "failed-start"
        assert json.loads((out / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(lowres.ConfigError, match=f"in use by pid {os.getpid()}"):
            with rundir.RunDirectory(out):
                pass
    assert any("stale lock of pid 999999" in line for line in lines)
    assert not (out / rundir.LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------------------
# 4: --init-from runs resume (also from a TOML file naming init_from, like emcjax.legacy import writes)


def test_init_from_run_resumes(finished, datasets, tmp_path):
    toml = tmp_path / "imported.toml"
    toml.write_text(f'data = "{datasets["main"]}"\ninit_from = "{finished}"\n[emc]\nrotation_n = 2\n')
    lowres.main(["--config", str(toml), "--out", str(tmp_path / "a"), "--iters", "1"])
    lowres.main(["--config", str(toml), "--out", str(tmp_path / "a"), "--iters", "2", "--resume"])
    quiet_run(data=datasets["main"], out=tmp_path / "b", iters=2, init_from=finished)
    assert_same_arrays(tmp_path / "a", tmp_path / "b", iterations=(2,))


# ----------------------------------------------------------------------------------------------------
# 5: a failed start leaves nothing that blocks a retry


def test_failed_start_leaves_nothing(finished, datasets, tmp_path, capsys):
    source = runio.read_run(finished)
    wrong = tmp_path / "wrong"
    runio.write_intensities(wrong, source.intensity, source.hkl, source.integrated, source.phi[:10])
    out = tmp_path / "run"
    args = ["--data", str(datasets["main"]), "--out", str(out), "--iters", "1", *FLAGS]
    assert "10 frames" in cli_error(lowres.main, [*args, "--init-from", str(wrong)], capsys)
    assert not out.exists()
    out.mkdir()  # an existing empty directory stays, empty
    assert "10 frames" in cli_error(lowres.main, [*args, "--init-from", str(wrong)], capsys)
    assert list(out.iterdir()) == []
    lowres.main([*args, "--init-from", str(finished)])  # the retry needs nothing by hand
    assert runio.read_run(out).attrs["iteration"] == 1


@pytest.mark.parametrize("resume", [False, True])
def test_leftovers_of_a_killed_start_are_cleared(resume, finished, datasets, tmp_path, capsys):
    """What a start killed before its first checkpoint leaves: a stale lock, config, run.json, metrics, an
    iteration file and an unfinished checkpoint. The same command (or --resume) starts over."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.toml", "run.json", "metrics.jsonl", "iterations"):
        (shutil.copytree if name == "iterations" else shutil.copy)(finished / name, out / name)
    (out / "checkpoints" / "0.orbax-checkpoint-tmp").mkdir(parents=True)
    (out / rundir.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone"}))
    assert rundir.status(out) == "failed-start"
    argv = ["--out", str(out), "--resume"] if resume else ["--data", str(datasets["main"]), "--out", str(out),
                                                             "--iters", "2", *FLAGS]
    lowres.main(argv)
    assert "removed what a start that never reached its first checkpoint left" in capsys.readouterr().out
    assert [r["iteration"] for r in runio.read_metrics(out)] == [1, 2]
    assert_same_arrays(out, finished, iterations=(1, 2))


def test_a_directory_with_a_run_or_other_files_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    assert "holds a run" in cli_error(lowres.main, ["--out", str(run), "--iters", "3", *FLAGS], capsys)
    assert snapshot(run) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert "not an emcjax run" in cli_error(lowres.main, ["--out", str(tmp_path / "mine"), *FLAGS], capsys)
    assert "holds no run to resume" in cli_error(lowres.main, ["--out", str(tmp_path / "mine"), "--resume"], capsys)
    assert snapshot(tmp_path / "mine") == {"notes.txt": b"mine"}


# ----------------------------------------------------------------------------------------------------
# 6: outputs are readable by colleagues (the umask's mode, not 0600)


def test_outputs_get_the_umask_mode(finished, datasets):
    umask = os.umask(0o022)
    os.umask(umask)
    assert atomic_files.file_mode() == 0o666 & ~umask
    modes = {str(p.relative_to(finished)): p.stat().st_mode & 0o777 for p in finished.rglob("*") if p.is_file()}
    modes["data"] = datasets["main"].stat().st_mode & 0o777
    assert {m for m in modes.values()} == {0o666 & ~umask}, modes


# ----------------------------------------------------------------------------------------------------
# 7, 8, 9, 10: bad input gives one line and exit status 2


def _copy_data(source: pathlib.Path, target: pathlib.Path, edit) -> pathlib.Path:
    shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        edit(f)
    return target


def _candidates(f) -> None:
    n = f["frames/frame_id"].shape[0]
    f["frames"].attrs["candidate_sampling_n"] = 2
    f["frames"].create_dataset("candidate_offsets", data=np.arange(n + 1, dtype=np.int64))
    rotations = np.zeros(n, np.int64)
    rotations[3] = 10**7
    f["frames"].create_dataset("candidate_rotations", data=rotations)


def _big_count(f) -> None:
    counts = f["frames/photon_counts"][()].astype(np.int64)
    counts[0] = 2**31
    del f["frames/photon_counts"]
    f["frames"].create_dataset("photon_counts", data=counts)


def _no_photons(f) -> None:
    n = f["frames/frame_id"].shape[0]
    for name, dtype in (("photon_pixels", np.int64), ("photon_counts", np.int32)):
        del f[f"frames/{name}"]
        f["frames"].create_dataset(name, data=np.zeros(0, dtype))
    f["frames/photon_offsets"][...] = np.zeros(n + 1, np.int64)


@pytest.mark.parametrize("case", ["candidate_index", "count_2_31", "no_photons", "negative_d_min", "binary_config",
                                  "out_under_a_file", "unwritable_out"])
def test_bad_input_is_one_line(case, datasets, tmp_path, capsys):
    d = datasets["main"]
    out = tmp_path / "run"
    argv = ["--out", str(out), "--iters", "1", *FLAGS]
    if case == "candidate_index":
        argv += ["--data", str(_copy_data(d, tmp_path / "c.h5", _candidates))]
        expected = "rotation index 10000000, expected 0 .. 419"
    elif case == "count_2_31":
        argv += ["--data", str(_copy_data(d, tmp_path / "c.h5", _big_count))]
        expected = "count 2147483648 received, expected <= 2147483647"
    elif case == "no_photons":
        argv += ["--data", str(_copy_data(d, tmp_path / "c.h5", _no_photons))]
        expected = "holds no photon in any frame"
    elif case == "negative_d_min":
        argv += ["--data", str(d), "--emc.d-min", "-3"]
        expected = "emc.d_min must be a resolution > 0 Å, got -3.0"
    elif case == "binary_config":
        (tmp_path / "c.toml").write_bytes(bytes(range(256)))
        argv += ["--data", str(d), "--config", str(tmp_path / "c.toml")]
        expected = "is not a TOML text file"
    elif case == "out_under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub"
        argv = ["--data", str(d), "--out", str(out), "--iters", "1", *FLAGS]
        expected = "cannot create run directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "run"
        argv = ["--data", str(d), "--out", str(out), "--iters", "1", *FLAGS]
        expected = "cannot create run directory"
    before = snapshot(tmp_path)
    assert expected in cli_error(lowres.main, argv, capsys)
    assert snapshot(tmp_path) == before  # nothing written, the run directory not even created
    assert not out.exists()


def test_unusable_truth_is_dropped_with_a_warning(datasets, tmp_path):
    def flat_truth(f):
        del f["truth/intensity"]
        f["truth"].create_dataset("intensity", data=np.ones(7))

    bad = _copy_data(datasets["main"], tmp_path / "t.h5", flat_truth)
    final, lines = quiet_run(data=bad, out=tmp_path / "run", iters=1)
    assert any("/truth is not usable" in line for line in lines)
    assert final["iteration"] == 1 and final.get("cc_true") is None
    assert (tmp_path / "run" / "intensities.h5").exists()


def test_simulate_refuses_to_overwrite_and_names_the_flag(datasets, tmp_path, capsys):
    path = tmp_path / "d.h5"
    path.write_bytes(b"precious")
    message = cli_error(simulate.main, ["--out", str(path), "--n-frames", "2"], capsys)
    assert "add --overwrite" in message and path.read_bytes() == b"precious"


def test_simulate_refuses_a_resolution_the_detector_does_not_reach(tmp_path, capsys):
    message = cli_error(simulate.main, ["--out", str(tmp_path / "d.h5"), "--n-frames", "2",
                                        "--geometry.resolution-max-A", "1.0"], capsys)
    assert "geometry.resolution_max_A" in message and "outermost pixel" in message
    assert not (tmp_path / "d.h5").exists()


# ----------------------------------------------------------------------------------------------------
# 8: checkpoints that survive damage; a full disk


def test_truncated_newest_checkpoint_falls_back(finished, reference, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    assert checkpoint.complete_steps(run) == [0, 1, 2]
    for path in (run / "checkpoints" / "2").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    lowres.main(["--out", str(run), "--resume", "--iters", "4"])
    printed = capsys.readouterr().out
    assert "warning: checkpoint 2" in printed and "cannot be read" in printed and "resumed" in printed
    assert [p.name.split("-")[0] for p in (run / checkpoint.DAMAGED_DIR).iterdir()] == ["2"]
    assert [r["iteration"] for r in runio.read_metrics(run)] == [1, 2, 3, 4]
    assert_same_arrays(run, reference, iterations=(2, 3, 4))


def test_full_disk_is_one_line_and_the_run_resumes(datasets, reference, env, tmp_path):
    """A file-size limit (as a full disk: writes fail with an OS error) stops the run after its first
    checkpoint with one line and exit status 2; without the limit, --resume finishes it."""
    out = tmp_path / "run"

    args = [sys.executable, "-m", "emcjax.lowres", "--data", str(datasets["main"]), "--out", str(out), "--iters", "4",
            *FLAGS]
    limited = ["bash", "-c", "trap '' XFSZ; ulimit -f 20; exec \"$@\"", "bash", *args]  # 20 KiB per file
    no_cache = {k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT") and k != "JAX_COMPILATION_CACHE_DIR"}
    full = subprocess.run(limited, capture_output=True, text=True, env=no_cache, timeout=300)  # (JAX's cache
    # would warn that it cannot write under the limit)
    assert full.returncode == 2, full.stderr
    assert full.stderr.strip().startswith("error: ") and "\n" not in full.stderr.strip(), full.stderr
    assert "File too large" in full.stderr and "resume" in full.stderr
    lowres.main(["--out", str(out), "--resume"])
    assert_same_arrays(out, reference, iterations=(2, 3, 4))


# ----------------------------------------------------------------------------------------------------
# The kill test: SIGKILL at 5 moments, streaming, resumes to the arrays of an uninterrupted run


def _lines(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_killed_five_times_resumes_to_the_uninterrupted_arrays(datasets, env, tmp_path):
    """Kills a streamed run (blocks of 16 frames re-read from disk at every E-step) with SIGKILL: during
    set-up, while checkpoint 2 is being written, and three times at a random moment of a random iteration;
    each time ``--resume`` continues; the final arrays equal those of an uninterrupted run."""
    rng = random.Random(15)
    out, whole = tmp_path / "killed", tmp_path / "whole"
    base = ["--data", str(datasets["main"]), "--iters", "5", "--emc.block-frames", "16", "--emc.stream", *FLAGS]
    command = [sys.executable, "-m", "emcjax.lowres"]
    done = subprocess.run([*command, *base, "--out", str(whole)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    def kill_when(args, trigger, delay, worker=None) -> str:
        process = subprocess.Popen(worker or [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env)
        lines, seen = _lines(process), []
        while (line := lines.get(timeout=300)) is not None:
            seen.append(line)
            if trigger(line):
                time.sleep(delay)
                process.kill()
                break
        process.wait(timeout=60)
        return "".join(seen)

    log = [kill_when([*base, "--out", str(out)], lambda s: s.startswith("emcjax.lowres:"), rng.uniform(0, 0.3))]
    assert "problem:" not in log[-1] and rundir.status(out) in ("new", "failed-start"), log[-1]  # in set-up
    log.append(kill_when(None, lambda s: False, 0, worker=[sys.executable, str(ROOT / "tests" / "kill_worker.py"), "2",
                                                               *base, "--out", str(out), "--resume"]))
    assert "SIGKILL while writing checkpoint 2" in log[-1], log[-1]
    assert any(".orbax-checkpoint-tmp" in p.name for p in (out / "checkpoints").iterdir())  # caught mid-write
    for _ in range(3):  # after a random iteration (past the last checkpoint), at a random moment
        after = rng.randint(max(checkpoint.complete_steps(out)) + 1, 5)
        log.append(kill_when([*base, "--out", str(out), "--resume"],
                             lambda s, after=after: s.startswith(f"iter {after}/"), rng.uniform(0, 0.2)))
        assert f"iter {after}/" in log[-1], log[-1]
    final = subprocess.run([*command, "--out", str(out), "--resume"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    assert_same_arrays(out, whole, iterations=(5,))
    metrics = [(r["iteration"], r["log_likelihood"]) for r in runio.read_metrics(out)]
    assert metrics == [(r["iteration"], r["log_likelihood"]) for r in runio.read_metrics(whole)], "\n".join(log)
