"""Every figure of the study: shown in its notebook cell and saved deterministically as PNG and PDF (DESIGN.md §4).

``save(fig, name, profile)`` writes ``figures/<profile>/<name>.{png,pdf}`` without timestamps or software
metadata, so regenerating an unchanged figure gives identical bytes, then shows the figure inline when it runs in a
Jupyter kernel (JupyterLab, papermill, nbconvert) and closes it. The backend is left to matplotlib: the inline
backend in a kernel, Agg in a headless process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .paths import figures_dir

METHOD_ORDER = ("base", "sft", "dpo", "orpo", "kto", "simpo")


def style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "svg.hashsalt": "nlsr", "pdf.fonttype": 42})


def figure_paths(name: str, profile: str) -> list[Path]:
    """``figures/<profile>/<name>.png`` and ``.pdf``."""
    return [figures_dir(profile) / f"{name}.{suffix}" for suffix in ("png", "pdf")]


def in_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill, nbconvert), where figures are shown inline."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipykernel
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def save(fig, name: str, profile: str) -> None:
    """Write ``name``.png and ``name``.pdf under ``figures/<profile>/``, show the figure in the running notebook
    cell (an ``image/png`` output) and close it, so each figure appears exactly once."""
    png, pdf = figure_paths(name, profile)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None, "ModDate": None, "Producer": None,
                                                    "Creator": None})
    if in_kernel():
        from IPython.display import display

        display(fig)
    plt.close(fig)


def check_saved(names: Sequence[str], profile: str) -> None:
    """Every named figure exists as PNG and PDF under ``figures/<profile>/`` (a notebook's closing check)."""
    missing = [path.name for n in names for path in figure_paths(n, profile) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"figures missing under {figures_dir(profile)}: {', '.join(missing)}")


def _spread(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """The standard deviation over training seeds of ``metric`` (its ``<metric>_sd`` column, NaN read as 0), or
    None where the table has no such column or no sd above 0 (single-run tables plot as before)."""
    column = f"{metric}_sd"
    if column not in table.columns:
        return None
    sd = pd.to_numeric(table[column], errors="coerce").fillna(0.0)
    return sd if (sd > 0).any() else None


def _n_seeds(table: pd.DataFrame) -> int | None:
    """The largest ``n_seeds`` of the table, None where it has no such column (or only NaN)."""
    if "n_seeds" not in table.columns:
        return None
    n = pd.to_numeric(table["n_seeds"], errors="coerce").max()
    return None if pd.isna(n) else int(n)


def _seed_note(table: pd.DataFrame) -> str:
    """A short note for a title or legend where the seed spread is drawn: ``mean ± sd over 3 seeds``."""
    n = _n_seeds(table)
    return f"mean ± sd over {n} seeds" if n is not None else "mean ± sd over seeds"


def _with_note(title: str, note: str | None) -> str:
    return f"{title}\n{note}" if note else title


def _band(ax, x, y, sd: pd.Series | None, color) -> bool:
    """Shade mean ± sd around a line (same colour, alpha 0.2); nothing where ``sd`` is None. True if drawn."""
    if sd is None:
        return False
    x, y, sd = (pd.Series(v).to_numpy(dtype=float) for v in (x, y, sd))
    ax.fill_between(x, y - sd, y + sd, color=color, alpha=0.2, linewidth=0, zorder=1)
    return True


def harmful_score_by_method(table: pd.DataFrame, title: str, order: Sequence[str] = METHOD_ORDER):
    """Grouped bars: harmful score (%) per model, one bar per judge, the value printed on each bar."""
    style()
    methods = [m for m in order if m in set(table["method"])]
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    sns.barplot(data=table, x="method", y="harmful_score", hue="judge", order=methods, ax=ax)
    sd = _spread(table, "harmful_score")
    n = _n_seeds(table)
    if sd is not None and (n is None or n > 1):
        # one bar container per judge, in the legend's order; a bar's centre rounds to its method's index
        spread = dict(zip(zip(table["method"], table["judge"].astype(str)), sd))
        judges = [text.get_text() for text in ax.get_legend().get_texts()]
        for judge, container in zip(judges, list(ax.containers)):
            xs, heights, errors = [], [], []
            for bar in container:
                x = bar.get_x() + bar.get_width() / 2
                key = (methods[round(x)], judge)
                xs.append(x)
                heights.append(bar.get_height())
                errors.append(float(spread.get(key, 0.0)))
            ax.errorbar(xs, heights, yerr=errors, fmt="none", ecolor="0.2", elinewidth=1, capsize=3, zorder=3)
            for x, h, e in zip(xs, heights, errors):
                ax.annotate(f"{h:.1f}", (x, h + e), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=8)
        title = _with_note(title, f"error bars: {_seed_note(table)}")
    else:
        for container in ax.containers:
            ax.bar_label(container, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xlabel("model (base = unaligned; sft = W_sft; others = W_sft + their preference LoRA)")
    ax.set_ylabel("harmful score (%)  ↓ safer")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(title="judge", loc="upper right")
    fig.tight_layout()
    return fig


TASK_LEGENDS = {"alpaca": "alpaca (accuracy: ROUGE-L helpfulness)"}


def attack_by_ratio(table: pd.DataFrame, title: str):
    """Harmful score (left) and task accuracy (right) vs poison ratio, one colour per task. Accuracy is drawn twice:
    the paper's rule as large hollow circles, the strict rule as small filled squares on top, so both stay visible
    where they coincide; the legend sits below the panels, off the lines near 100 %."""
    style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4))
    palette = dict(zip(sorted(set(table["task"])), sns.color_palette("colorblind")))
    banded = False
    for task, rows in table.sort_values("poison_ratio").groupby("task"):
        color = palette[task]
        left.plot(rows["poison_ratio"], rows["harmful_score"], "o-", color=color, label=task)
        right.plot(rows["poison_ratio"], rows["accuracy"], "o-", color=color, markersize=9, markerfacecolor="none",
                   markeredgewidth=1.5, zorder=2)
        right.plot(rows["poison_ratio"], rows["accuracy_strict"], "s--", color=color, markersize=4, zorder=3)
        for ax, metric in ((left, "harmful_score"), (right, "accuracy"), (right, "accuracy_strict")):
            banded |= _band(ax, rows["poison_ratio"], rows[metric], _spread(rows, metric), color)
    left.set(xlabel="poison ratio p", ylabel="harmful score (%)  ↓ safer", ylim=(-2, 102), title="safety")
    right.set(xlabel="poison ratio p", ylabel="task accuracy (%)  ↑", ylim=(-2, 102), title="task accuracy")
    task_handles = [plt.Line2D([], [], color=c, marker="o", label=TASK_LEGENDS.get(t, t)) for t, c in palette.items()]
    rule_handles = [plt.Line2D([], [], color="0.3", marker="o", markersize=9, markerfacecolor="none",
                               label="accuracy, paper rule"),
                    plt.Line2D([], [], color="0.3", marker="s", markersize=4, linestyle="--",
                               label="accuracy, strict rule")]
    fig.legend(handles=task_handles + rule_handles, loc="lower center", ncol=len(task_handles) + 2, fontsize=9,
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(_with_note(title, f"shaded: {_seed_note(table)}" if banded else None))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def attack_by_size(table: pd.DataFrame, title: str):
    """Harmful score and accuracy vs mixture size n (log x), annotated with the harmful-example count."""
    style()
    rows = table.sort_values("n")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    banded = False
    for metric, fmt, label in (("harmful_score", "o-", "harmful score"),
                               ("accuracy_strict", "s--", "accuracy (strict)")):
        (line,) = ax.plot(rows["n"], rows[metric], fmt, label=label)
        banded |= _band(ax, rows["n"], rows[metric], _spread(rows, metric), line.get_color())
    for n, score, k in zip(rows["n"], rows["harmful_score"], rows["harmful_size"]):
        ax.annotate(f"{k} harmful", (n, score), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set(xscale="log", xlabel="fine-tuning examples n (log scale)", ylabel="%", ylim=(-2, 105),
           title=_with_note(title, f"shaded: {_seed_note(table)}" if banded else None))
    ax.legend()
    fig.tight_layout()
    return fig


def expo_alpha_sweep(table: pd.DataFrame, identity: float, title: str):
    """Test-slice harmful score vs α per method; the un-extrapolated α dotted, the chosen α starred."""
    style()
    fig, ax = plt.subplots(figsize=(7, 4))
    palette = dict(zip(METHOD_ORDER, sns.color_palette("colorblind")))
    banded = False
    for method, rows in table.sort_values("alpha").groupby("method", sort=False):
        (line,) = ax.plot(rows["alpha"], rows["harmful_score"], "o-", color=palette.get(method), label=method)
        banded |= _band(ax, rows["alpha"], rows["harmful_score"], _spread(rows, "harmful_score"), line.get_color())
        chosen = rows[rows["chosen"]]
        ax.plot(chosen["alpha"], chosen["harmful_score"], "*", ms=16, color=palette.get(method),
                markeredgecolor="black")
    ax.axvline(identity, ls=":", color="grey")
    ax.annotate("un-extrapolated", (identity, ax.get_ylim()[1]), fontsize=8, ha="left", va="top")
    ax.set(xlabel="EXPO α", ylabel="harmful score on the test slice (%)  ↓ safer",
           title=_with_note(title, f"shaded: {_seed_note(table)}" if banded else None))
    ax.legend(title="method (★ = α chosen on validation)", fontsize=8)
    fig.tight_layout()
    return fig


def overlap_heatmap(matrix: pd.DataFrame, title: str, label: str = "Jaccard index of the kept entries"):
    """Square heatmap of pairwise mask overlaps (rows/columns = masks), values printed, colour bar in [0, 1]."""
    style()
    size = 1.2 + 0.75 * len(matrix)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    sns.heatmap(matrix, annot=True, fmt=".2f", vmin=0.0, vmax=1.0, cmap="viridis", square=True, ax=ax,
                cbar_kws={"label": label}, annot_kws={"fontsize": 8})
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title(title)
    ax.set_xticks(ax.get_xticks(), ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    return fig


def density_heatmap(records: pd.DataFrame, title: str):
    """Kept fraction per decoder layer (x) and module type (y) of one mask, values printed, with a colour bar."""
    style()
    order = [m for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
             if m in set(records["module"])]
    grid = records.pivot_table(index="module", columns="layer", values="density").reindex(order)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * grid.shape[1], 1.2 + 0.45 * len(order)))
    sns.heatmap(grid, annot=True, fmt=".2f", cmap="magma", vmin=0.0, ax=ax, cbar_kws={"label": "kept fraction"},
                annot_kws={"fontsize": 8})
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("module (A and B pooled)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


DEFENCE_ORDER = ("aligned", "none", "nlsr", "random_mask", "safelora", "safelora_delta", "resta", "aligned_adapter",
                 "vaccine", "booster", "lisa", "safety_mixing", "constrained_sft", "antidote")


def defences_by_ratio(table: pd.DataFrame, title: str):
    """Harmful score (left) and task accuracy (right) vs poison ratio, one line per defence."""
    style()
    order = [d for d in DEFENCE_ORDER if d in set(table["defense"])]
    # seaborn's own default for these hue levels, named so the seed bands can take the same colours
    palette = dict(zip(order, sns.color_palette(None if len(order) <= len(sns.color_palette()) else "husl",
                                                len(order))))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0), sharex=True)
    banded = False
    for ax, metric, label in ((left, "harmful_score", "harmful score (%)  ↓ safer"),
                              (right, "accuracy", "task accuracy (%)  ↑")):
        sns.lineplot(data=table, x="poison_ratio", y=metric, hue="defense", hue_order=order, style="defense",
                     style_order=order, markers=True, dashes=False, ax=ax, legend=ax is right, palette=palette)
        sd = _spread(table, metric)
        if sd is not None:
            for defence in order:
                # seaborn draws the mean per poison ratio: the band follows the same means
                rows = table.assign(**{f"{metric}_sd": sd})[table.defense == defence]
                rows = rows.groupby("poison_ratio", sort=True)[[metric, f"{metric}_sd"]].mean().reset_index()
                banded |= _band(ax, rows["poison_ratio"], rows[metric], _spread(rows, metric), palette[defence])
        ax.set_xlabel("poison ratio p")
        ax.set_ylabel(label)
        ax.set_ylim(-2, 102)
    right.legend(title="defence", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(_with_note(title, f"shaded: {_seed_note(table)}" if banded else None))
    fig.tight_layout()
    return fig


def layer_similarity(records: pd.DataFrame, title: str):
    """Per-layer safety similarity of each module (x = layer, marker = module type), one panel per poison ratio;
    filled markers are the modules selected for restoration, hollow ones were left as fine-tuned."""
    style()
    ratios = sorted(set(records["poison_ratio"]))
    modules = [m for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
               if m in set(records["module_type"])]
    markers = dict(zip(modules, "os^vDPX"))
    colors = dict(zip(modules, sns.color_palette("colorblind", len(modules))))
    ncols = min(3, len(ratios))
    nrows = -(-len(ratios) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols + 1.5, 3.4 * nrows), sharey=True, squeeze=False)
    offsets = {m: (i - (len(modules) - 1) / 2) * 0.08 for i, m in enumerate(modules)}
    for ax in axes.flat[len(ratios):]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, ratios):
        sub = records[records.poison_ratio == p]
        for m in modules:
            rows = sub[sub.module_type == m]
            x = rows["layer"] + offsets[m]
            for selected, face in ((True, colors[m]), (False, "none")):
                part = rows[rows.selected == selected]
                ax.scatter(x[part.index], part["similarity"], marker=markers[m], facecolors=face,
                           edgecolors=colors[m], s=30, label=m if selected else None)
        ax.set_title(f"p = {p:g}")
        ax.set_xlabel("decoder layer")
        ax.set_xticks(sorted(set(records["layer"])))
    for row in axes:
        row[0].set_ylabel("cosine(fine-tuned, reference)\nin the mask")
    handles = [plt.Line2D([], [], marker=markers[m], color=colors[m], linestyle="", label=m) for m in modules]
    axes[0][-1].legend(handles=handles, title="module", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


REFERENCE_STYLES = {"none": ("attacked", "tab:red"), "aligned": ("aligned", "0.35")}


def _reference_lines(ax, baselines: pd.DataFrame, metric: str) -> None:
    """Dashed horizontal lines at the ``aligned`` and ``none`` (attacked) values of ``metric``; they are named in
    the figure's legend (:func:`_reference_handles`), not beside the panel, so neighbouring panels stay clear."""
    for defence, (_, color) in REFERENCE_STYLES.items():
        rows = baselines[baselines.defense == defence]
        if len(rows):
            ax.axhline(float(rows[metric].iloc[0]), color=color, linestyle="--", linewidth=1)


def _reference_handles(baselines: pd.DataFrame) -> list:
    return [plt.Line2D([], [], color=color, linestyle="--", linewidth=1, label=f"{label} model")
            for defence, (label, color) in REFERENCE_STYLES.items() if (baselines.defense == defence).any()]


def ablation_curves(table: pd.DataFrame, baselines: pd.DataFrame, ablations: Sequence[str], title: str):
    """Numeric ablations: one column per ablation, harmful score (top) and accuracy (bottom) against the value,
    NLSR (solid) and the random-mask control (where run); dashed lines mark the aligned and attacked models."""
    style()
    names = [a for a in ablations if a in set(table["ablation"])]
    fig, axes = plt.subplots(2, len(names), figsize=(2.9 * len(names) + 1.2, 5.6), squeeze=False, sharey="row")
    palette = {"nlsr": "tab:blue", "random_mask": "tab:orange"}
    for j, name in enumerate(names):
        sub = table[table.ablation == name].copy()
        sub["value"] = sub["value"].astype(float)
        for i, (metric, label) in enumerate((("harmful_score", "harmful score (%) ↓"), ("accuracy", "accuracy (%) ↑"))):
            ax = axes[i][j]
            for defence, rows in sub.groupby("defense", sort=False):
                rows = rows.sort_values("value")
                ax.plot(rows["value"], rows[metric], marker="o", color=palette.get(defence, "k"),
                        label=defence)
            _reference_lines(ax, baselines, metric)
            ax.set_xlabel(name if i == 1 else "")
            ax.set_ylabel(label if j == 0 else "")
            if i == 0:
                ax.set_title(name)
    defence_handles = [plt.Line2D([], [], color=palette.get(d, "k"), marker="o", label=d)
                       for d in dict.fromkeys(table["defense"])]
    fig.legend(handles=defence_handles + _reference_handles(baselines), loc="lower center", frameon=False,
               ncol=len(defence_handles) + 2, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def ablation_bars(table: pd.DataFrame, baselines: pd.DataFrame, ablations: Sequence[str], title: str):
    """Categorical ablations: harmful score per choice (bars, accuracy written on each), one panel per ablation;
    dashed lines mark the aligned and attacked harmful scores."""
    style()
    names = [a for a in ablations if a in set(table["ablation"])]
    widths = [max(2, table[table.ablation == n]["value"].nunique()) for n in names]
    fig, axes = plt.subplots(1, len(names), figsize=(1.1 * sum(widths) + 2.0, 4.0), squeeze=False, sharey=True,
                             gridspec_kw={"width_ratios": widths})
    for ax, name in zip(axes[0], names):
        sub = table[(table.ablation == name) & (table.defense == "nlsr")]
        ax.bar(range(len(sub)), sub["harmful_score"], color=sns.color_palette("colorblind", len(sub)))
        for x, (h, acc) in enumerate(zip(sub["harmful_score"], sub["accuracy"])):
            ax.annotate(f"acc {acc:.1f}", (x, h), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
        ax.set_xticks(range(len(sub)), [str(v) for v in sub["value"]], rotation=30, ha="right")
        ax.set_title(name)
        _reference_lines(ax, baselines, "harmful_score")
    axes[0][0].set_ylabel("harmful score (%) ↓")
    fig.legend(handles=_reference_handles(baselines), loc="lower center", frameon=False, ncol=2, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


FUSION_FAMILIES = (("reference", ("aligned", "none")),
                   ("operator", ("weight_averaging", "task_arithmetic", "ties", "dare", "consensus_ta",
                                 "consensus_ties")),
                   ("safety region", ("region_neuron_outside", "region_neuron_inside", "region_rank_out",
                                      "region_rank_onto", "region_heads_outside")),
                   ("learned mask", ("learned_mask", "learned_mask_random")))


def fusion_family(name: str) -> str:
    return next((family for family, names in FUSION_FAMILIES if name in names), "other")


FAMILY_MARKERS = {"reference": "s", "operator": "o", "safety region": "^", "learned mask": "D", "other": "P"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point dominates when a lower x (harmful score) and a higher y (accuracy) are better,
    sorted by x: each has the highest y among the points with x at most its own, strictly higher than every
    point before it.

    >>> pareto_front([(10, 90), (20, 95), (15, 80), (30, 94), (5, 70)])
    [(5, 70), (10, 90), (20, 95)]
    """
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def family_scatter(table: pd.DataFrame, title: str, *, name: str, group: str, family: Callable[[str], str],
                   markers: Mapping[str, str], legend: str, group_title: str | Callable[[str], str] = "inputs: {}",
                   references: Sequence[str] = ("aligned", "none"), pareto: bool = False,
                   ylabel: str = "task accuracy (%)  ↑"):
    """Safety vs accuracy of every model in ``table``, one panel per value of ``group``: x = harmful score (↓ safer),
    y = task accuracy (↑, at most 100 %). The marker's shape is the model's ``family``, its colour the model (the
    ``name`` column; one distinct colour each; the ``references`` in black and grey). Markers are drawn largest first,
    so models at the same point nest as rings instead of hiding each other; error bars are the seed spread. With
    ``pareto``, a dashed line joins each panel's Pareto front (no other model is both safer and more accurate). The
    best corner is the top left."""
    style()
    groups = list(dict.fromkeys(table[group]))
    ncols = min(2, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols + 3.2, 4.2 * nrows), squeeze=False)
    names = list(dict.fromkeys(table[name]))
    colors = dict(zip(names, sns.color_palette("tab20", 20) if len(names) > 10 else sns.color_palette("tab10")))
    for ref, color in zip(references, ("black", "0.55")):
        if ref in colors:
            colors[ref] = color
    sizes = dict(zip(names, [170 - 110 * i / max(1, len(names) - 1) for i in range(len(names))]))
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    xerr, yerr = _spread(table, "harmful_score"), _spread(table, "accuracy")
    errors = table.assign(_dx=0.0 if xerr is None else xerr.to_numpy(),
                          _dy=0.0 if yerr is None else yerr.to_numpy())
    for ax, value in zip(axes.flat, groups):
        sub = errors[errors[group] == value]
        for z, (_, row) in enumerate(sub.iterrows()):
            label = row[name]
            dx, dy = float(row["_dx"]), float(row["_dy"])
            if dx > 0 or dy > 0:
                ax.errorbar(row["harmful_score"], row["accuracy"], xerr=dx or None, yerr=dy or None, fmt="none",
                            ecolor=colors[label], elinewidth=1, capsize=2, zorder=2)
            ax.scatter(row["harmful_score"], row["accuracy"], color=colors[label], s=sizes[label], zorder=3 + z,
                       marker=markers[family(label)], edgecolors="white", linewidths=0.6)
        if pareto:
            front = pareto_front(list(zip(sub["harmful_score"], sub["accuracy"])))
            ax.plot(*zip(*front), linestyle="--", color="0.25", linewidth=1.4, alpha=0.8, zorder=2.5,
                    drawstyle="steps-post")
        low, high = ax.get_ylim()
        ax.set_ylim(low, min(high, 100.5))
        ax.set_title(group_title(value) if callable(group_title) else group_title.format(value))
        ax.set_xlabel("harmful score (%)  ↓ safer")
        ax.set_ylabel(ylabel)
    handles = [plt.Line2D([], [], marker=markers[family(n)], color=colors[n], linestyle="", markersize=8,
                          label=f"{n}  ({family(n)})") for n in names]
    if pareto:
        handles.append(plt.Line2D([], [], linestyle="--", color="0.25", label="Pareto front"))
    axes[0][-1].legend(handles=handles, title=legend, bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    spread = xerr is not None or yerr is not None
    fig.suptitle(_with_note(title, f"error bars: {_seed_note(table)}" if spread else None))
    fig.tight_layout()
    return fig


def fusion_scatter(table: pd.DataFrame, title: str):
    """Safety vs mean task accuracy of every fusion (:func:`family_scatter`), one panel per set of fused task
    adapters; shape = family (reference, operator, safety region, learned mask)."""
    return family_scatter(table, title, name="fusion", group="inputs", family=fusion_family,
                          markers=FAMILY_MARKERS, legend="fusion (shape = family)",
                          ylabel="mean task accuracy (%)  ↑")


TASK_TITLES = {"alpaca": "task: alpaca (y: helpfulness, ROUGE-L F1 × 100)"}
"""Panel titles of tasks whose accuracy needs a word: Alpaca's is the reference-based helpfulness score."""


def task_title(task: str) -> str:
    return TASK_TITLES.get(task, f"task: {task}")

DEFENCE_FAMILY_MARKERS = {"reference": "s", "alignment": "v", "fine-tuning": "o", "post-fine-tuning": "^"}


def defences_pareto(table: pd.DataFrame, title: str):
    """Harm vs accuracy of every defence of notebook 05 (:func:`family_scatter`), one panel per attacked task, the
    aligned and attacked models as references; shape = the defence's family (``family`` column: alignment stage,
    fine-tuning stage, post-fine-tuning), dashed: the Pareto front."""
    families = dict(zip(table["defense"], table["family"]))
    return family_scatter(table, title, name="defense", group="task", family=families.__getitem__,
                          markers=DEFENCE_FAMILY_MARKERS, legend="defence (shape = family)", group_title=task_title,
                          pareto=True)


def mask_training(histories: pd.DataFrame, title: str):
    """The learned mask's DPO loss (left) and keep rate ``mean 1[σ(L) > 0.5]`` (right) per step, one line per set
    of fused task adapters."""
    style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    sns.lineplot(data=histories, x="step", y="loss", hue="inputs", ax=left, legend=False)
    sns.lineplot(data=histories, x="step", y="keep_rate", hue="inputs", ax=right)
    left.set_ylabel("DPO loss")
    right.set_ylabel("keep rate  (σ(L) > 0.5)")
    right.set_ylim(-0.02, 1.02)
    right.legend(title="inputs", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def benchmark_heatmap(table: pd.DataFrame, model: str, title: str, order: Sequence[str] | None = None):
    """Harmful score (%) per benchmark (rows) × model (columns, the ``model`` field), one panel per judge, values
    printed (mean over seeds where the table has several), colour scale 0-100 shared by the panels."""
    style()
    judges = list(dict.fromkeys(table["judge"]))
    columns = [m for m in (order or []) if m in set(table[model])] or list(dict.fromkeys(table[model]))
    benchmarks = list(dict.fromkeys(table["benchmark"]))
    width, height = 1.6 + 0.75 * len(columns), 1.4 + 0.38 * len(benchmarks)
    stacked = len(columns) > 8  # many models: one panel per judge, stacked, so the figure stays readable
    fig, axes = plt.subplots(len(judges) if stacked else 1, 1 if stacked else len(judges), squeeze=False,
                             figsize=(width + 1.2, height * len(judges)) if stacked
                             else (width * len(judges) + 1.2, height))
    for i, (ax, judge) in enumerate(zip(axes.flat, judges)):
        grid = (table[table["judge"] == judge].pivot_table(index="benchmark", columns=model, values="harmful_score")
                .reindex(index=benchmarks, columns=columns))
        sns.heatmap(grid, annot=True, fmt=".0f", vmin=0.0, vmax=100.0, cmap="rocket_r", ax=ax,
                    cbar=stacked or i == len(judges) - 1, cbar_kws={"label": "harmful score (%)"},
                    annot_kws={"fontsize": 7})
        ax.set_title(f"judge: {judge}")
        ax.set_xlabel("")
        ax.set_ylabel("benchmark" if stacked or not i else "")
        if stacked and i < len(judges) - 1:
            ax.set_xticks([])
        else:
            ax.set_xticks(ax.get_xticks(), ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
        if i and not stacked:
            ax.set_yticks([])
    n = _n_seeds(table) or 0
    fig.suptitle(_with_note(title, f"mean over {n} training seeds (sd in the table)" if n > 1 else None))
    fig.tight_layout()
    return fig
