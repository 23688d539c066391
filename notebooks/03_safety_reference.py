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
# # 03 — A stronger safety reference by extrapolation (EXPO)
#
# EXPO extrapolates each aligned adapter away from its starting point (spec/nlsr.md §3):
# `θ_expo = θ_sft + (1+α)(θ_aligned − θ_sft)`, which in LoRA form scales **B** by 1+α (DESIGN.md §6; the
# option `expo.mode: factor_scaling` reproduces the reference code, both factors × 2α). Only adapter files are
# read and written. α is chosen per method on a **validation slice** of unsafe prompts disjoint from the test
# slice; the table reports the test-slice harmful score of every α, with α = 0 the un-extrapolated model
# (paper mode). α is chosen again at every training seed (the headline table: mean ± sd over seeds); the curve's
# test scores are the first seed's, its validation scores every seed's.

# %% tags=["parameters"]
params_file = "params/tiny.yaml"  # relative to the repository root; e.g. params/smoke.yaml for a quick check

# %%
import pandas as pd
from IPython.display import Markdown, display

from nlsr_lib import plots
from nlsr_lib.config import load_params
from nlsr_lib.results import markdown_table, write_seeded_results
from nlsr_lib.runs import Run
from nlsr_lib.stages import notebooks
from nlsr_lib.stages.expo import expo_alphas, identity_alpha

params = load_params(params_file)
run = Run(params.profile)
identity = identity_alpha(params)
print(f"profile {params.profile}: mode {params.expo.mode}, alphas {expo_alphas(params)}, methods {params.expo.methods}")

# %% [markdown]
# Each EXPO candidate's harmful score on the validation and test slices; `chosen` is the α of the method's
# **reference** stage, the lowest validation score (ties: the smallest α), which notebooks 04–07 use.

# %%
study = notebooks.safety_reference(params, run)
columns = ["method", "alpha", "mode", "val_harmful_score", "harmful_score", "empty", "chosen"]
rows = write_seeded_results(study["records"], "03_safety_reference", params.profile, by=["method", "alpha"],
                            metrics=["val_harmful_score", "harmful_score", "empty"], columns=columns)
table = pd.DataFrame(rows)

# %% [markdown]
# ## The EXPO table: the un-extrapolated model and the chosen α per method (test slice), over training seeds
# `alpha` lists the α chosen at each seed; `change` = expo − aligned, per seed, then averaged.

# %%
chosen = write_seeded_results(study["chosen"], "03_expo_chosen", params.profile, by=["method"],
                              metrics=["aligned", "expo", "change"], columns=["method", "alpha", "aligned", "expo",
                                                                             "change"])
display(Markdown(markdown_table(chosen, ["method", "alpha", "aligned", "expo", "change", "n_seeds"])))

# %%
first = pd.DataFrame([r for r in study["records"] if r["seed"] == params.seeds[0]])  # the test curve is one seed's
fig = plots.expo_alpha_sweep(first, identity, f"EXPO ({params.expo.mode} mode): harmful score vs α "
                                              f"({params.profile}, seed {params.seeds[0]})")
plots.save(fig, "03_harmful_score_vs_alpha", params.profile)

# %%
plots.check_saved(["03_harmful_score_vs_alpha"], params.profile)
print("03_safety_reference: stages built in this run:", run.built_summary())
