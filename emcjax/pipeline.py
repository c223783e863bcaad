"""From detector images (or a sparse data set) to an MTZ in one command: ``python -m emcjax.pipeline --config run.toml``.

Runs, in order, each stage through its Python entry point (not as a subprocess):

1. ``reduce`` (``emcjax.reduce``, only with ``--images``): detector images -> ``OUT/reduced.h5``;
2. ``orient`` (``emcjax.orient``, when the data set has spots but no candidate orientations) -> ``OUT/oriented.h5``;
3. ``lowres`` (``emcjax.lowres``): all frames -> ``OUT/lowres/``;
4. ``reject`` (``emcjax.reject``): flags frames -> ``OUT/lowres/rejection.h5``;
5. ``highres`` (``emcjax.highres --frame-weights``, only with ``--highres.enabled``): the kept frames, local
   update from the all-frames run to ``--highres.resolution`` -> ``OUT/highres/``;
6. ``half_a``, ``half_b`` (``emcjax.lowres --half a|b --frame-weights``): the kept frames split in two, each
   from its own random start -> ``OUT/half_a/``, ``OUT/half_b/``; with ``--highres.enabled`` each half goes on
   to the high resolution from its own low-res run (``half_a_highres``, ``half_b_highres`` ->
   ``OUT/half_a_highres/``, ``OUT/half_b_highres/``), so the two halves stay independent in every stage;
7. ``resolution`` (``emcjax.resolution``): merging table, suggested limit, sigma(I) of the (last) half-set
   runs -> ``OUT/merged/``;
8. ``export`` (``emcjax.export``): ``OUT/merged.mtz`` (cut at the suggested limit unless ``--keep-all``).

A stage whose outputs are complete and unchanged for the same inputs and settings is skipped (checksums in
``OUT/pipeline.json``, emcjax.pipeline_state); an interrupted stage is resumed (reduce and orient from their
partial files, the EMC runs from their checkpoints); a stage whose inputs or settings changed is run again,
and every stage after it. At the end: frames used and rejected by reason, the merging table, the suggested
resolution with its criterion, the MTZ and the wall time per stage (also in ``OUT/summary.txt``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time

from emcjax import atomic_files, cli, rundir, runio, toml_config
from emcjax.pipeline_config import PipelineConfig, check
from emcjax.pipeline_stages import Stage, stages
from emcjax.pipeline_state import PipelineState, summary_text

SUMMARY_FILE = "summary.txt"


def _prepare_run_dir(stage: Stage, fresh: bool, log) -> bool:
    """Whether an EMC stage resumes; a fresh start (new key) or a directory that holds no resumable run
    starts over (the directory is the pipeline's own)."""
    status = rundir.status(stage.run_dir)
    if not fresh and status == "started":
        return True
    if status in ("started", "foreign") or (status == "failed-start" and stage.name.endswith("highres")):
        # (a highres start that stopped before its first checkpoint cannot be resumed; lowres clears its own)
        why = ("made with other inputs or settings" if fresh else
               "holds files no run writes" if status == "foreign" else "no checkpoint to resume from")
        log(f"  removing {stage.run_dir} ({why})")
        shutil.rmtree(stage.run_dir)
    return False


def _run_stage(stage: Stage, state: PipelineState, number: str, log) -> None:
    key = state.key(stage.settings, stage.inputs)
    if state.is_done(stage.name, key):
        log(f"[{number}] {stage.name}: done earlier, outputs unchanged; skipped ({stage.what})")
        return
    fresh = not state.was_started(stage.name, key)
    if stage.run_dir is not None:
        resume = _prepare_run_dir(stage, fresh, log)
    else:
        resume = not fresh
    log(f"[{number}] {stage.name}: {'resuming' if resume else 'running'} ({stage.what})")
    state.start(stage.name, key)
    start = time.perf_counter()
    summary = stage.call(resume, lambda line: log("  " + str(line).replace("\n", "\n  ")))
    state.finish(stage.name, stage.products, time.perf_counter() - start, summary or {})


def run(config: PipelineConfig, log=print) -> dict:
    """Runs every stage not done yet (module docstring); returns the pipeline record (``OUT/pipeline.json``).

    Raises:
      ConfigError: neither --images nor --data, or both; another pipeline holds ``out``.
      DataError: a missing or unreadable input; what a stage raises.
    """
    check(config)
    out = config.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    lock = rundir.RunLock(out)
    lock.acquire(log)
    try:
        state = PipelineState(out)
        toml_config.save_config(out / runio.CONFIG_FILE, dataclasses.replace(config, config=None),
                          header="emcjax.pipeline resolved config; reuse with --config")
        start = time.perf_counter()
        plan = stages(config, out)
        next(plan)
        done = []
        stage = plan.send(state)
        while True:
            _run_stage(stage, state, str(len(done) + 1), log)
            done.append(stage.name)
            try:
                stage = plan.send(state)
            except StopIteration:
                break
        text = summary_text(state, done, time.perf_counter() - start)
        atomic_files.write_text_atomic(out / SUMMARY_FILE, text + "\n")
        log(text)
    finally:
        lock.release()
    return state.record


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> PipelineConfig:
    """``--config FILE.toml`` (if given) supplies the defaults, flags override."""
    import sys

    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    default = PipelineConfig()
    config_file = toml_config.config_argument(argv)
    if config_file is not None:
        default = toml_config.config_from_toml(PipelineConfig, config_file)
    return tyro.cli(PipelineConfig, prog="python -m emcjax.pipeline", args=argv, default=default,
                    description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> None:
    """``python -m emcjax.pipeline``: errors become one line and exit status 2 (``emcjax.cli``)."""
    cli.run_cli(lambda args: run(parse_args(args)), argv, "emcjax.pipeline")


if __name__ == "__main__":
    main()
