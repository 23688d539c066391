"""Every figure of the study, saved deterministically as PNG and PDF (DESIGN.md §4).

``save(fig, name, profile)`` writes ``figures/<profile>/<name>.{png,pdf}`` without timestamps or software
metadata, so regenerating an unchanged figure gives identical bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .paths import figures_dir  # noqa: E402

METHOD_ORDER = ("base", "sft", "dpo", "orpo", "kto", "simpo")


def style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "svg.hashsalt": "nlsr", "pdf.fonttype": 42})


def save(fig, name: str, profile: str) -> list[Path]:
    """Write ``name``.png and ``name``.pdf under ``figures/<profile>/``; returns both paths."""
    out = figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "ModDate": None, "Producer": None,
                                                         "Creator": None})
    return paths


def harmful_score_by_method(table: pd.DataFrame, title: str, order: Sequence[str] = METHOD_ORDER):
    """Grouped bars: harmful score (%) per model, one bar per judge, the value printed on each bar."""
    style()
    methods = [m for m in order if m in set(table["method"])]
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    sns.barplot(data=table, x="method", y="harmful_score", hue="judge", order=methods, ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xlabel("model (base = unaligned; others = W_sft + aligned LoRA)")
    ax.set_ylabel("harmful score (%)  ↓ safer")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(title="judge", loc="upper right")
    fig.tight_layout()
    return fig
