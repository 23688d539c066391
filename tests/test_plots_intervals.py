"""Seed spread in the figures (nlsr_lib.plots): with ``<metric>_sd`` / ``n_seeds`` columns the line plots get
mean ± sd bands, the bars and the fusion scatter get error bars, and the title carries a short note; tables without
those columns (or with sd all 0 / NaN) draw exactly the artists they drew before."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer

from nlsr_lib import plots

NOTE = "mean ± sd over 3 seeds"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def with_sd(table: pd.DataFrame, metrics, value=2.0, n_seeds=3) -> pd.DataFrame:
    """``table`` with ``<m>_sd``, ``<m>_lo``, ``<m>_hi`` for each metric and ``n_seeds``."""
    out = table.copy()
    for m in metrics:
        out[f"{m}_sd"] = value
        out[f"{m}_lo"] = out[m] - 1.0
        out[f"{m}_hi"] = out[m] + 1.0
    out["n_seeds"] = n_seeds
    return out


def bars() -> pd.DataFrame:
    return pd.DataFrame({"method": ["base", "sft", "dpo"] * 2, "judge": ["keyword"] * 3 + ["moderation"] * 3,
                         "harmful_score": [60.0, 40.0, 10.0, 55.0, 35.0, 12.0], "empty": 0.0, "n": 20})


def by_ratio() -> pd.DataFrame:
    rows = [{"task": task, "poison_ratio": p, "harmful_score": 10 + 50 * p + i, "accuracy": 80 - i,
             "accuracy_strict": 70 - i, "empty": 0.0}
            for i, task in enumerate(("sst2", "agnews")) for p in (0.0, 0.1, 0.2)]
    return pd.DataFrame(rows)


def by_size() -> pd.DataFrame:
    return pd.DataFrame({"n": [100, 1000, 300], "harmful_score": [20.0, 50.0, 30.0],
                         "accuracy_strict": [60.0, 80.0, 70.0], "harmful_size": [10, 100, 30]})


def sweep() -> pd.DataFrame:
    rows = [{"method": m, "alpha": a, "harmful_score": 30 - 10 * a + i, "val_harmful_score": 31 - 10 * a,
             "chosen": a == 1.0} for i, m in enumerate(("dpo", "kto")) for a in (0.0, 0.5, 1.0)]
    return pd.DataFrame(rows)


def defences() -> pd.DataFrame:
    rows = [{"defense": d, "poison_ratio": p, "harmful_score": 10 + 40 * p + 5 * i, "accuracy": 80 - 3 * i}
            for i, d in enumerate(("aligned", "none", "nlsr")) for p in (0.05, 0.1, 0.2)]
    return pd.DataFrame(rows)


def fusions() -> pd.DataFrame:
    rows = [{"fusion": f, "inputs": g, "harmful_score": 10.0 + 5 * i + j, "accuracy": 70.0 + i - j}
            for j, g in enumerate(("sst2", "sst2+agnews")) for i, f in enumerate(("aligned", "none", "ties"))]
    return pd.DataFrame(rows)


def texts(fig) -> str:
    found = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        found.append(ax.get_title())
        if ax.get_legend():
            found += [t.get_text() for t in ax.get_legend().get_texts()]
    return "\n".join(found)


def polys(fig) -> list[int]:
    return [sum(isinstance(c, PolyCollection) for c in ax.collections) for ax in fig.axes]


def errorbars(fig) -> list[int]:
    return [sum(isinstance(c, ErrorbarContainer) for c in ax.containers) for ax in fig.axes]


def test_spread_and_note():
    table = pd.DataFrame({"harmful_score": [1.0, 2.0], "harmful_score_sd": [np.nan, 0.5], "n_seeds": [1, 3]})
    assert plots._spread(table, "harmful_score").tolist() == [0.0, 0.5]
    assert plots._spread(table, "accuracy") is None
    assert plots._spread(table.assign(harmful_score_sd=0.0), "harmful_score") is None
    assert plots._spread(table.assign(harmful_score_sd=np.nan), "harmful_score") is None
    assert plots._seed_note(table) == NOTE


def test_bars_get_error_bars_with_sd():
    plain = plots.harmful_score_by_method(bars(), "t")
    spread = plots.harmful_score_by_method(with_sd(bars(), ["harmful_score", "empty"]), "t")
    assert errorbars(plain) == [0]
    assert errorbars(spread) == [2]  # one per judge
    (container,) = [c for c in spread.axes[0].containers if isinstance(c, ErrorbarContainer)][:1]
    segments = container.lines[2][0].get_segments()
    assert len(segments) == 3 and all(np.isclose(s[1][1] - s[0][1], 4.0) for s in segments)  # ± 2
    assert NOTE in texts(spread) and NOTE not in texts(plain)
    # the values stay printed: one label per bar
    assert sum(len(t.get_text()) > 0 and t.get_text()[0].isdigit() for t in spread.axes[0].texts) == 6


@pytest.mark.parametrize("n_seeds, value", [(1, 0.0), (1, np.nan), (3, 0.0), (3, np.nan)])
def test_bars_without_spread_plot_as_before(n_seeds, value):
    fig = plots.harmful_score_by_method(with_sd(bars(), ["harmful_score"], value=value, n_seeds=n_seeds), "t")
    assert errorbars(fig) == [0] and "seeds" not in texts(fig)
    assert len(fig.axes[0].texts) == 6


def test_bars_one_seed_no_error_bars():
    fig = plots.harmful_score_by_method(with_sd(bars(), ["harmful_score"], value=1.0, n_seeds=1), "t")
    assert errorbars(fig) == [0] and "seeds" not in texts(fig)


def test_attack_by_ratio_bands():
    metrics = ["harmful_score", "accuracy", "accuracy_strict"]
    plain = plots.attack_by_ratio(by_ratio(), "t")
    spread = plots.attack_by_ratio(with_sd(by_ratio(), metrics), "t")
    tasks = 2
    assert [s - p for s, p in zip(polys(spread), polys(plain))] == [tasks, 2 * tasks]
    assert polys(plain) == [0, 0]
    assert NOTE in texts(spread) and "seeds" not in texts(plain)
    assert [len(ax.lines) for ax in spread.axes] == [len(ax.lines) for ax in plain.axes]  # markers unchanged
    band = next(c for c in spread.axes[0].collections if isinstance(c, PolyCollection))
    line = spread.axes[0].lines[0]
    assert np.allclose(band.get_facecolor()[0][:3], matplotlib.colors.to_rgb(line.get_color()))
    assert np.isclose(band.get_alpha(), 0.2)


def test_attack_by_ratio_nan_sd_is_no_band():
    table = with_sd(by_ratio(), ["harmful_score"], value=np.nan)
    fig = plots.attack_by_ratio(table, "t")
    assert polys(fig) == [0, 0] and "seeds" not in texts(fig)


def test_attack_by_size_bands():
    plain = plots.attack_by_size(by_size(), "t")
    spread = plots.attack_by_size(with_sd(by_size(), ["harmful_score", "accuracy_strict"]), "t")
    assert polys(plain) == [0] and polys(spread) == [2]
    assert NOTE in spread.axes[0].get_title() and "seeds" not in texts(plain)
    colors = [matplotlib.colors.to_rgb(line.get_color()) for line in spread.axes[0].lines]
    bands = [c for c in spread.axes[0].collections if isinstance(c, PolyCollection)]
    assert [tuple(b.get_facecolor()[0][:3]) for b in bands] == [pytest.approx(c) for c in colors]


def test_expo_alpha_sweep_bands():
    plain = plots.expo_alpha_sweep(sweep(), 0.0, "t")
    spread = plots.expo_alpha_sweep(with_sd(sweep(), ["harmful_score", "val_harmful_score"]), 0.0, "t")
    assert polys(plain) == [0] and polys(spread) == [2]
    assert NOTE in spread.axes[0].get_title() and "seeds" not in texts(plain)


def test_defences_by_ratio_bands():
    plain = plots.defences_by_ratio(defences(), "t")
    spread = plots.defences_by_ratio(with_sd(defences(), ["harmful_score", "accuracy"]), "t")
    assert [s - p for s, p in zip(polys(spread), polys(plain))] == [3, 3]
    assert NOTE in texts(spread) and "seeds" not in texts(plain)
    only_accuracy = plots.defences_by_ratio(with_sd(defences(), ["accuracy"]), "t")
    assert [s - p for s, p in zip(polys(only_accuracy), polys(plain))] == [0, 3]


def test_fusion_scatter_error_bars():
    plain = plots.fusion_scatter(fusions(), "t")
    spread = plots.fusion_scatter(with_sd(fusions(), ["harmful_score", "accuracy"]), "t")
    assert errorbars(plain) == [0, 0]
    assert errorbars(spread) == [3, 3]
    container = next(c for c in spread.axes[0].containers if isinstance(c, ErrorbarContainer))
    assert container.has_xerr and container.has_yerr
    assert NOTE in texts(spread) and "seeds" not in texts(plain)
    x_only = plots.fusion_scatter(with_sd(fusions(), ["harmful_score"]), "t")
    container = next(c for c in x_only.axes[0].containers if isinstance(c, ErrorbarContainer))
    assert container.has_xerr and not container.has_yerr
