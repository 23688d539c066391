# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 — What makes restoration work: ablations of NLSR
#
# One attacked adapter (`ablation.method` attacked on `ablation.task` at `ablation.poison_ratio`; DPO on SST-2 at
# p = 0.1 by default) is defended with one NLSR parameter changed at a time (spec/nlsr.md §5, §9; DESIGN.md §6):
# the mask's sparsity and rank kept, ρ and ε of the adaptive selection, τ of layer-level correction, the seed of
# the draw, the region scorer, the selection direction, the EXPO or the plain aligned reference, and neuron-level
# vs whole-module correction. Where the mask size or the draw matters, the random-mask control runs beside NLSR.
# Dashed lines: the model before the attack (`aligned`) and the attacked model.

# %% tags=["parameters"]
params_file = "params/tiny.yaml"  # relative to the repository root; e.g. params/smoke.yaml for a quick check

# %%
import pandas as pd
from IPython.display import Markdown, display

from nlsr_lib import plots
from nlsr_lib.config import load_params
from nlsr_lib.intervals import aggregate
from nlsr_lib.results import markdown_table, write_seeded_results
from nlsr_lib.runs import Run
from nlsr_lib.stages import notebooks
from nlsr_lib.stages.ablation import ABLATIONS

params = load_params(params_file)
run = Run(params.profile)
a = params.ablation
print(f"profile {params.profile}: {a.method} attacked on {a.task} at p = {a.poison_ratio}; "
      f"ablations {list(ABLATIONS)}")
study = notebooks.restoration_ablation(params, run)

# %% [markdown]
# ## Baselines: the aligned adapter and the attacked one (no defence)

# %%
baselines = pd.DataFrame(aggregate(study["baselines"], by=["defense"], metrics=["harmful_score", "empty", "accuracy"]))
display(baselines.round(1))

# %% [markdown]
# ## Every ablation point

# %%
# Every training seed under `seed_scope: all` (the tiny profile: mean ± sd), else the first seed with a 95 %
# bootstrap interval over the prompts. The `seed` ablation varies the restoration's own draw, not the training seed.

columns = ["ablation", "value", "defense", "harmful_score", "empty", "accuracy", "restored_modules", "modules"]
rows = write_seeded_results(study["records"], "07_restoration_ablation", params.profile,
                            by=["ablation", "value", "defense"], metrics=["harmful_score", "empty", "accuracy"],
                            columns=columns)
table = pd.DataFrame(rows)
display(Markdown(markdown_table(rows, columns)))

# %% [markdown]
# ## Numeric ablations

# %%
numeric = ["mask_sparsity", "rank_keep_ratio", "prune_rate", "epsilon", "tau", "seed"]
fig = plots.ablation_curves(table, baselines, numeric,
                            f"NLSR ablations, {a.method} attacked on {a.task} at p = {a.poison_ratio:g} "
                            f"({params.profile})")
plots.save(fig, "07_ablation_curves", params.profile)

# %% [markdown]
# ## Categorical ablations: scorer, selection direction, reference, correction level, strategy

# %%
categorical = ["scorer", "favor", "reference", "correction", "strategy"]
fig = plots.ablation_bars(table, baselines, categorical,
                          f"NLSR design choices, {a.method} attacked on {a.task} at p = {a.poison_ratio:g} "
                          f"({params.profile})")
plots.save(fig, "07_ablation_choices", params.profile)

# %% [markdown]
# ## Recovery: the share of the attack's harmful-score rise that each point undoes
#
# `recovery = (attacked − defended) / (attacked − aligned)`; 1 = back to the aligned model, 0 = no effect.

# %%
h_aligned, h_attacked = (float(baselines.set_index("defense").loc[d, "harmful_score"]) for d in ("aligned", "none"))
rise = h_attacked - h_aligned
table["recovery"] = (h_attacked - table["harmful_score"]) / rise if rise > 0 else float("nan")
display(table.pivot_table(index=["ablation", "value"], columns="defense", values=["recovery", "accuracy"]).round(2))

# %%
plots.check_saved(["07_ablation_curves", "07_ablation_choices"], params.profile)
print("07_restoration_ablation: stages built in this run:", run.built_summary())
