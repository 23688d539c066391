"""Progress modes (nlsr_lib/progress.py) and inline figures (plots.save)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from nlsr_lib import plots, progress


@pytest.mark.parametrize("env, expected", [
    ({}, "bars"), ({"NLSR_QUIET": "1"}, "off"), ({"NLSR_QUIET": "0"}, "bars"), ({"CI": "true"}, "off"),
    ({"NLSR_PROGRESS": "lines", "CI": "true"}, "lines"), ({"NLSR_PROGRESS": "BARS", "NLSR_QUIET": "1"}, "bars"),
])
def test_progress_mode_from_the_environment(monkeypatch, env, expected):
    for name in ("NLSR_PROGRESS", "NLSR_QUIET", "CI"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert progress.mode() == expected
    assert progress.bar(range(3), "x").disable is (expected != "bars")


def test_unknown_progress_mode_names_the_choices(monkeypatch):
    monkeypatch.setenv("NLSR_PROGRESS", "loud")
    with pytest.raises(ValueError, match="bars, lines, off"):
        progress.mode()


def test_save_writes_png_and_pdf_and_closes_the_figure(nlsr_home):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    assert plots.save(fig, "probe", "unit") is None
    assert all(p.stat().st_size > 500 for p in plots.figure_paths("probe", "unit"))
    assert not plt.fignum_exists(fig.number)  # shown once (inline in a kernel), never again at the cell's end
    plots.check_saved(["probe"], "unit")
