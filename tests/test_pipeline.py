"""emcjax.pipeline without the EMC: the stage record (what is skipped, what runs again) and the errors of the
command. The pipeline end to end (from images, interrupted and rerun) is in tests/test_tutorial.py."""

from __future__ import annotations

import json
import os

import pytest

from clitest import cli_error
from emcjax import pipeline
from emcjax.pipeline_state import STATE_FILE, PipelineState


def test_a_stage_is_done_only_for_the_same_settings_inputs_and_unchanged_products(tmp_path):
    data, product = tmp_path / "data.h5", tmp_path / "product.h5"
    data.write_bytes(b"frames")
    state = PipelineState(tmp_path)
    key = state.key({"iters": 3}, [data])
    assert not state.is_done("lowres", key) and not state.was_started("lowres", key)
    state.start("lowres", key)
    assert state.was_started("lowres", key) and not state.is_done("lowres", key)  # started, not finished
    product.write_bytes(b"model")
    state.finish("lowres", [product], 1.5, {"cc_true": 0.99})

    reloaded = PipelineState(tmp_path)  # what a rerun reads
    assert reloaded.is_done("lowres", key)
    assert reloaded.stages["lowres"]["summary"] == {"cc_true": 0.99}
    assert reloaded.key({"iters": 4}, [data]) != key  # other settings
    data.write_bytes(b"other frames")
    assert reloaded.key({"iters": 3}, [data]) != key  # other input bytes (size and mtime change the cache stamp)
    product.write_bytes(b"edited")
    assert not reloaded.is_done("lowres", key)  # a changed product is not trusted
    product.unlink()
    assert not reloaded.is_done("lowres", key)


def test_input_checksums_are_of_the_bytes_not_the_path(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    state = PipelineState(tmp_path)
    assert state.digest(a) == state.digest(b)
    os.utime(b, ns=(1, 1))  # same bytes, another modification time: checksummed again, same digest
    assert state.digest(b) == state.digest(a)


def test_record_is_written_atomically_as_json(tmp_path):
    state = PipelineState(tmp_path)
    state.start("reject", "k")
    record = json.loads((tmp_path / STATE_FILE).read_text())
    assert record["format"] == "emcjax-pipeline" and record["stages"]["reject"]["status"] == "started"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(Exception, match="not readable JSON"):
        PipelineState(tmp_path)


def test_command_errors_are_one_line(tmp_path, capsys):
    data = tmp_path / "data.h5"
    line = cli_error(pipeline.main, ["--out", str(tmp_path / "p")], capsys)
    assert "--images" in line and "--data" in line
    line = cli_error(pipeline.main, ["--data", str(data), "--images", "x.cbf", "--out", str(tmp_path / "p")], capsys)
    assert "not both" in line
    line = cli_error(pipeline.main, ["--data", str(data), "--out", str(tmp_path / "p")], capsys)
    assert str(data) in line and "does not exist" in line
    config = tmp_path / "run.toml"
    config.write_text('data = "x.h5"\n[lowres]\niterations = 3\n')
    line = cli_error(pipeline.main, ["--config", str(config)], capsys)
    assert "iterations" in line
    line = cli_error(pipeline.main, ["--data", str(data), "--lowres.iters", "0"], capsys)
    assert "lowres.iters" in line
    line = cli_error(pipeline.main, ["--data", str(data), "--highres.enabled"], capsys)
    assert "highres.enabled" in line and "lowres.emc.d_min" in line  # a local update needs a low-res cutoff
    line = cli_error(pipeline.main, ["--data", str(data), "--highres.enabled", "--lowres.emc.d-min", "6",
                                     "--highres.resolution", "7"], capsys)
    assert "highres.resolution" in line and "6.0" in line


def test_toml_arrays_fill_fixed_length_tuples(tmp_path):
    """runio converted ``cell = [...]`` into a tuple of the field's types (zip in the wrong order)."""
    config = tmp_path / "run.toml"
    config.write_text('data = "x.h5"\n[reduce]\ncell = [36, 36.0, 30.0, 90.0, 90.0, 90.0]\n')
    parsed = pipeline.parse_args(["--config", str(config)])
    assert parsed.reduce.cell == (36.0, 36.0, 30.0, 90.0, 90.0, 90.0)
    assert all(isinstance(x, float) for x in parsed.reduce.cell)


def test_help_lists_every_stage_setting(capsys):
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--images", "--data", "--reduce.mask.file", "--orient.sampling-n", "--lowres.iters",
                 "--lowres.emc.vn", "--reject.criteria.phi-min", "--reject.drop", "--highres.enabled", "--highres.resolution", "--halves.split",
                 "--resolution.n-shells"):
        assert flag in text, flag


def test_reject_drop_from_toml_and_flags_reaches_the_reject_stage(tmp_path, capsys):
    from emcjax import pipeline_stages

    config = tmp_path / "run.toml"
    config.write_text('data = "x.h5"\n[reject]\ndrop = ["phi_zero"]\n')
    parsed = pipeline.parse_args(["--config", str(config)])
    assert parsed.reject.drop == ("phi_zero",)
    stage = pipeline_stages._reject_stage(parsed, tmp_path / "lowres", [])
    assert stage.settings["drop"] == ["phi_zero"]  # what emcjax.reject gets, and part of the stage's key
    default = pipeline_stages._reject_stage(pipeline.parse_args(["--data", "x.h5"]), tmp_path / "lowres", [])
    assert len(default.settings["drop"]) == 6  # every reason drops by default, as with emcjax.reject
    state = PipelineState(tmp_path)
    assert state.key(stage.settings, []) != state.key(default.settings, [])  # another drop reruns reject
    flagged = pipeline.parse_args(["--config", str(config), "--reject.drop", "phi_zero", "no_crystal"])
    assert flagged.reject.drop == ("phi_zero", "no_crystal")
    no_evidence = pipeline.parse_args(["--config", str(config), "--reject.no-evidence-test"])
    assert pipeline_stages._reject_stage(no_evidence, tmp_path / "lowres", []).settings["evidence_test"] is False
    assert default.settings["evidence_test"] is True
    config.write_text('data = "x.h5"\n[reject]\ndrop = ["blank"]\n')
    line = cli_error(pipeline.main, ["--config", str(config)], capsys)
    assert "reject.drop" in line and "phi_zero" in line


def test_pipeline_experiment_highres_option_turns_on_the_highres_stages():
    """experiments/pipeline.py --highres D: the low-res runs to D Å, then the pipeline's [highres] stages."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("experiments_pipeline", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    data, out = pathlib.Path("data.h5"), pathlib.Path("out")
    plain = pipeline.parse_args(experiment.pipeline_args(data, out, 3))
    assert not plain.highres.enabled and plain.lowres.emc.d_min is None
    config = pipeline.parse_args(experiment.pipeline_args(data, out, 3, highres=6.0))
    assert config.highres.enabled and config.lowres.emc.d_min == 6.0 and config.highres.iters == 3
    assert config.lowres.iters == 3 and config.data == data
