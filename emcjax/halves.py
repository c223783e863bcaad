"""Both half sets and their merging statistics in one command:
``python -m emcjax.halves --run RUN_OR_TOML --out DIR``.

Takes the settings of a low-resolution run (a run directory's ``config.toml``, or a TOML file as for
``lowres --config``), reconstructs half a and half b with them (``lowres --half a`` / ``--half b``: disjoint
frames, independent random starts, emcjax.merge.halves) into ``DIR/a`` and ``DIR/b``, then computes the
merging statistics, sigma(I) and the resolution estimate into ``DIR/merged`` (``python -m
emcjax.resolution``), ready for ``python -m emcjax.export --run DIR/merged``. ``--frame-weights`` (e.g. the
run's ``rejection.h5``), ``--iters``, ``--seed`` and ``--split`` override the run's settings.

From Python: ``emcjax.halves.run(HalvesConfig(run=..., out=...))``, or ``run_halves(lowres_config, out)``
with a ``LowresConfig`` built in code.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal

from emcjax import cli, lowres, resolution, runio, toml_config
from emcjax.errors import ConfigError, DataError
from emcjax.merge import halves as halves_lib
from emcjax.merge import stats as stats_lib


@dataclasses.dataclass(frozen=True)
class HalvesConfig(stats_lib.MergingOptions):
    """Half-set reconstructions a and b with one run's settings, then their merging statistics."""

    run: pathlib.Path
    """The settings of both halves: a lowres run directory (its config.toml) or a lowres TOML config file."""
    out: pathlib.Path = pathlib.Path("runs/halves")
    """Directory for a/ and b/ (the half-set runs) and merged/ (merging statistics, merged.h5)."""
    frame_weights: pathlib.Path | None = None
    """Frame-weights file for both halves (e.g. RUN/rejection.h5 of python -m emcjax.reject); default: the
    run's own setting."""
    iters: int | None = None
    """EMC iterations of each half; default: the run's."""
    seed: int | None = None
    """Seed from which each half draws the seed of its random start; default: the run's."""
    split: Literal["parity", "random"] | None = None
    """How the frames are split (lowres --split); default: the run's."""
    split_seed: int | None = None
    """Seed of --split random; default: the run's."""
    resume: bool = False
    """Continue halves that stopped (lowres --resume for each; a finished half is left as it is)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"iters must be >= 1, got {self.iters}")


def base_config(config: HalvesConfig) -> lowres.LowresConfig:
    """The lowres settings both halves share: ``config.run``'s, with the overrides of ``config`` applied."""
    source = pathlib.Path(config.run)
    path = source / runio.CONFIG_FILE if source.is_dir() else source
    if not path.is_file():
        raise DataError(
            f"run: {source} is neither a run directory with {runio.CONFIG_FILE} nor a TOML config file"
        )
    base = toml_config.config_from_toml(lowres.LowresConfig, path)
    if base.config is not None:
        raise ConfigError(f"{path}: key 'config' cannot be set inside a config file")
    overrides = {
        name: getattr(config, name)
        for name in ("frame_weights", "iters", "seed", "split", "split_seed")
        if getattr(config, name) is not None
    }
    return dataclasses.replace(base, half=None, resume=False, **overrides)


def run_halves(
    base: lowres.LowresConfig,
    out: pathlib.Path,
    *,
    resume: bool = False,
    merging: stats_lib.MergingOptions = stats_lib.MergingOptions(),
    log=print,
) -> dict:
    """Runs half a and half b with ``base``'s settings into ``out/a`` and ``out/b``, then the merging
    statistics into ``out/merged`` with the settings ``merging``.

    Returns:
      ``{"half_a": final metrics of half a, "half_b": ..., "merged": resolution.merge_halves's summary,
      "runs": {"a": path, "b": path, "merged": path}}``.

    Raises:
      ConfigError: ``base.half`` is set, or (without ``resume``) ``out/a`` or ``out/b`` already holds files.
    """
    out = pathlib.Path(out)
    if base.half is not None:
        raise ConfigError(f"half = {base.half!r}: the halves command runs both halves; leave 'half' unset")
    dirs = {h: out / h for h in halves_lib.HALVES}
    if not resume:  # before any work: a half's directory in use would stop the command half-way
        for h, d in dirs.items():
            if d.exists() and any(d.iterdir()):
                raise ConfigError(f"out: {d} already holds files; choose another --out, or add --resume")
    metrics = {}
    for h, d in dirs.items():
        half_config = dataclasses.replace(base, out=d, half=h, resume=False)
        if resume and (d / runio.CONFIG_FILE).exists():
            half_config = dataclasses.replace(half_config, resume=True)
        log(f"half {h}: python -m emcjax.lowres --half {h} --out {d}")
        metrics[h] = lowres.run(half_config, log=lambda line, h=h: log(f"[half {h}] {line}"))
    merged = out / "merged"
    log(f"merging: python -m emcjax.resolution --half-a {dirs['a']} --half-b {dirs['b']} --out {merged}")
    summary = resolution.merge_halves(
        resolution.ResolutionConfig(half_a=dirs["a"], half_b=dirs["b"], out=merged, **_merging_fields(merging)),
        log=log,
    )
    return {"half_a": metrics["a"], "half_b": metrics["b"], "merged": summary, "runs": {**dirs, "merged": merged}}


def run(config: HalvesConfig, log=print) -> dict:
    """``python -m emcjax.halves``: :func:`run_halves` with the settings of ``config.run``."""
    merging = stats_lib.MergingOptions(**_merging_fields(config))
    return run_halves(base_config(config), config.out, resume=config.resume, merging=merging, log=log)


def _merging_fields(options: stats_lib.MergingOptions) -> dict:
    """The MergingOptions fields of ``options`` (a MergingOptions or a subclass) by name."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(stats_lib.MergingOptions)}


main = cli.stage_main(HalvesConfig, run, "emcjax.halves", __doc__)


if __name__ == "__main__":
    main()
