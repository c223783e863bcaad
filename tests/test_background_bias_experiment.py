"""experiments/background_bias.py --quick (docs/METHOD-NOTES.md shows its full command): on 10 tutorial-like
frames at 0.05 photons per pixel the reduced background's excess over the truth is accounted for by the
truth's Bragg photons on the pixels the estimator keeps."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_background_bias_experiment_accounts_for_the_excess(capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import background_bias
    finally:
        sys.path.remove(str(REPO / "experiments"))
    (level, m), = background_bias.main(["--quick"]).items()
    assert level == 0.05 and "level  0.05 one crystal" in capsys.readouterr().out
    one = m["kind"] == 0
    excess = m["estimated"][one] - m["true"][one]
    explained = m["leaked"][one]
    # the estimate is high by tens of percent, and the leaked Bragg photons explain >= 80 % of it
    assert excess.sum() > 0.2 * m["true"][one].sum()
    assert abs(excess.sum() - explained.sum()) < 0.2 * excess.sum()
    assert np.all(m["leaked"] >= 0) and np.all(m["leaked"][m["kind"] == 1] == 0)  # blank frames: no Bragg photon
