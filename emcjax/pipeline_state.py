"""The record of a pipeline run (``OUT/pipeline.json``): which stage finished, for which inputs and settings.

A stage's *key* is the SHA-256 of its settings and of the checksums of its inputs (files given by the user,
or the products of the stages before it). A stage is done when the record holds the same key, the word
``done`` and the checksums of its products, and those products still exist with the same checksums; then
the pipeline skips it. A stage that was started with the same key but did not finish is resumed; one whose
key changed is run again from scratch. The file is rewritten atomically after every change
(``emcjax.atomic_files.write_text_atomic``), so an interruption leaves either the old record or the new one.

File checksums are cached by (size, modification time in ns), so a large data set is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from emcjax import atomic_files
from emcjax.merge.reject import REASONS
from emcjax.errors import DataError

STATE_FILE = "pipeline.json"
FORMAT = "emcjax-pipeline"
_CHUNK = 1 << 22


class PipelineState:
    """``OUT/pipeline.json``: per stage ``key``, ``status`` (``started`` | ``done``), ``products`` (path ->
    SHA-256), ``seconds`` (wall time of the run that finished it) and ``summary`` (what it reported)."""

    def __init__(self, out: pathlib.Path):
        self.path = pathlib.Path(out) / STATE_FILE
        self.record: dict[str, Any] = {"format": FORMAT, "stages": {}, "digests": {}}
        if self.path.exists():
            try:
                record = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise DataError(f"{self.path} is not readable JSON ({err}); remove it to run every stage again") from None
            if record.get("format") != FORMAT:
                raise DataError(f"{self.path}: format {record.get('format')!r}, expected {FORMAT!r}")
            self.record.update(record)

    @property
    def stages(self) -> dict[str, dict]:
        return self.record["stages"]

    def save(self) -> None:
        atomic_files.write_text_atomic(self.path, json.dumps(self.record, indent=1, sort_keys=True) + "\n")

    # -- checksums --------------------------------------------------------------------------------------

    def digest(self, path: str | os.PathLike) -> str:
        """SHA-256 of a file's bytes (cached by absolute path, size and modification time)."""
        path = pathlib.Path(path).absolute()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        cached = self.record["digests"].get(os.fspath(path))
        if cached and cached[:2] == stamp:
            return cached[2]
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        self.record["digests"][os.fspath(path)] = [*stamp, h.hexdigest()]
        return h.hexdigest()

    def key(self, settings: Mapping[str, Any], inputs: Iterable[str | os.PathLike]) -> str:
        """The key of a stage: its settings (JSON-able) and the checksums of its input files."""
        text = json.dumps({"settings": settings,
                           "inputs": {os.fspath(pathlib.Path(p).absolute()): self.digest(p) for p in inputs}},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    # -- stage records ----------------------------------------------------------------------------------

    def is_done(self, name: str, key: str) -> bool:
        """Whether stage ``name`` finished with this key and its products are unchanged."""
        entry = self.stages.get(name)
        if not entry or entry.get("key") != key or entry.get("status") != "done":
            return False
        for path, digest in entry.get("products", {}).items():
            if not pathlib.Path(path).is_file() or self.digest(path) != digest:
                return False
        return True

    def was_started(self, name: str, key: str) -> bool:
        """Whether stage ``name`` was started with this key (and may be resumed)."""
        entry = self.stages.get(name)
        return bool(entry) and entry.get("key") == key

    def start(self, name: str, key: str) -> None:
        self.stages[name] = {"key": key, "status": "started"}
        self.save()

    def finish(self, name: str, products: Iterable[str | os.PathLike], seconds: float, summary: Mapping) -> None:
        self.stages[name].update(
            status="done", seconds=round(seconds, 3), summary=_json(summary),
            products={os.fspath(pathlib.Path(p).absolute()): self.digest(p) for p in products},
        )
        self.save()


def _json(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, paths and other objects made JSON-able."""
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def summary_text(state: PipelineState, names: list[str], seconds: float) -> str:
    """The end-of-run summary: frames, rejection reasons, merging table, resolution, MTZ, time per stage."""
    s = {name: state.stages[name].get("summary", {}) for name in names}
    lines = ["", "== summary"]
    if "reduce" in s:
        lines.append(f"frames reduced: {s['reduce']['frames']}")
    if "orient" in s:
        o = s["orient"]
        lines.append(f"frames with candidate orientations: {o['kept']} of {o['frames']} ({o['frames'] - o['kept']} "
                     f"without: too few spots or matches; {'kept, with none to choose' if o.get('keep_empty') else 'dropped'})")
    r = s["reject"]
    lines.append(f"frames rejected: {r['rejected']} of {r['n_frames']} (a frame may have several reasons): "
                 + ", ".join(f"{k} {r[k]}" for k in REASONS))
    lines.append(f"frames used: {r['n_frames'] - r['rejected']} (half a {s['half_a']['frames_used']}, "
                 f"half b {s['half_b']['frames_used']})")
    if "highres" in s:
        h = s["highres"]
        cc = f", cc_true {h['cc_true']:.4f} (all kept frames)" if h.get("cc_true") is not None else ""
        lines.append(f"high resolution: local update to {h['resolution']:.2f} Å of the all-frames run and of each "
                     f"half set{cc}")
    table = pathlib.Path(state.path.parent / "merged" / "merging_table.txt")
    if table.exists():
        lines += ["", table.read_text().rstrip()]
    res = s["resolution"]
    if res.get("d_suggested") is not None:
        lines.append(f"resolution: {res['d_suggested']:.2f} Å by {res['criterion']}")
    else:
        lines.append(f"resolution: no shell passes {res['criterion']}")
    e = s["export"]
    cut = f", reflections to {e['d_min']:.2f} Å" if e.get("d_min") else ""
    lines.append(f"MTZ: {e['mtz']} (IMEAN, SIGIMEAN, I_half1, I_half2{cut}); text: {e['hkl']}")
    if "cc_true_imean" in e:
        lines.append(f"CC(IMEAN, truth): {e['cc_true_imean']:.4f} over {e['reflections']} reflections")
    lines.append("wall time per stage (s, of the run that made it): "
                 + ", ".join(f"{n} {state.stages[n].get('seconds', 0):.1f}" for n in names)
                 + f"; this command {seconds:.1f}")
    return "\n".join(lines)
