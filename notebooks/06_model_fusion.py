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
# # 06 — Model fusion: merging attacked task adapters back with the aligned one
#
# The adapters of notebook 02 (`fusion.method` attacked on each task at `fusion.poison_ratio`) are fused with
# the aligned adapter in LoRA-factor space, `θ_aligned + Merge({τ_t})` with `τ_t = θ_t − θ_aligned`
# (spec/somf.md §2.1, §3; spec/merging.md):
#
# * every merge operator: weight averaging, task arithmetic, TIES, DARE, Consensus TA and Consensus TIES;
# * fusion restricted by the safety region of notebook 04 (the NLSR low-rank region of the EXPO reference):
#   at neuron level (outside / inside the mask), rank level (the update projected out of / onto the safety
#   subspaces) and attention-head level (the heads owning most of the region keep their aligned values);
# * SOMF's **learned safety mask**: concrete-mask logits over the task vectors, trained with DPO on safety
#   preference pairs (temperature 0.5, rescaled by the mask mean, reference = the task model), exported as
#   `σ(L) > 0.5`; beside it its control `learned_mask_random`, the same mask permuted within each tensor (same
#   keep count and rescaling, positions not learned).
#
# Each task alone, then the three tasks together (multi-task fusion). `aligned` is the model before the attack,
# `none` the attacked adapter unfused. Harmful score on the test slice (primary judge); accuracy is the mean over
# the fused tasks (the paper's lenient rule). Single-task fusions (the headline table) at every training seed,
# mean ± sd; the multi-task fusion too under `seed_scope: all` (the tiny profile), else at the first seed.

# %% tags=["parameters"]
params_file = "params/tiny.yaml"  # relative to the repository root; e.g. params/smoke.yaml for a quick check

# %%
import pandas as pd
from IPython.display import Markdown, display

from nlsr_lib import plots
from nlsr_lib.config import load_params
from nlsr_lib.intervals import aggregate
from nlsr_lib.results import (api_usage, markdown_table, suite_metrics, write_agreement, write_seeded_results,
                             write_suite_results)
from nlsr_lib.runs import Run
from nlsr_lib.stages import notebooks
from nlsr_lib.stages.fusion import fusion_names

params = load_params(params_file)
run = Run(params.profile)
f = params.fusion
print(f"profile {params.profile}: {f.method} adapters attacked at p = {f.poison_ratio}; "
      f"fusions {fusion_names(params)}")

# %% [markdown]
# Per set of inputs (each task alone, then all together): the aligned adapter, the attacked one (single task) and
# every fusion, each with its harmful score and its accuracy on every input task (and their mean).

# %%
study = notebooks.model_fusion(params, run)
records = study["records"]
metrics = ["harmful_score", "empty", "accuracy", *(f"accuracy_{task}" for task in params.fusion.tasks)]
rows = write_seeded_results(records, "06_model_fusion", params.profile, by=["fusion", "inputs"], metrics=metrics,
                            columns=["fusion", "inputs", "harmful_score", "empty", "accuracy"])
table = pd.DataFrame(rows)

# %% [markdown]
# ## Results: harmful score | mean accuracy per fusion and set of inputs

# %%
display(table.pivot_table(index="fusion", columns="inputs", values=["harmful_score", "accuracy"], sort=False).round(1))
fig = plots.fusion_scatter(table, f"Safety vs accuracy of fusions of attacked {f.method} adapters "
                                  f"(p = {f.poison_ratio:g}, {params.profile})")
plots.save(fig, "06_fusion_scatter", params.profile)

# %% [markdown]
# ## Region fusion against plain task arithmetic
#
# The region variants restrict the `fusion.region_operator` update, so they are compared with that operator at
# comparable accuracy (within 5 points): Δ harm < 0 means the region made the fusion safer. Differences are taken
# per seed (paired: the same attacked adapters), then averaged (mean ± sd).

# %%
per_seed = pd.DataFrame(records)
base = per_seed[per_seed.fusion == f.region_operator].set_index(["inputs", "seed"])
regions = per_seed[per_seed.fusion.map(plots.fusion_family).isin(["safety region", "learned mask"])].copy()
regions["delta_harm_vs_operator"] = regions.apply(
    lambda r: r.harmful_score - base.loc[(r.inputs, r.seed), "harmful_score"], axis=1)
regions["delta_accuracy_vs_operator"] = regions.apply(
    lambda r: r.accuracy - base.loc[(r.inputs, r.seed), "accuracy"], axis=1)
deltas = aggregate(regions[["fusion", "inputs", "seed", "harmful_score", "accuracy", "delta_harm_vs_operator",
                            "delta_accuracy_vs_operator"]].to_dict("records"), by=["fusion", "inputs"],
                   metrics=["harmful_score", "accuracy", "delta_harm_vs_operator", "delta_accuracy_vs_operator"])
for row in deltas:
    row["safer_at_comparable_accuracy"] = (row["delta_harm_vs_operator"] < 0
                                           and row["delta_accuracy_vs_operator"] >= -5)
display(Markdown(markdown_table(deltas, ["fusion", "inputs", "harmful_score", "accuracy", "delta_harm_vs_operator",
                                         "delta_accuracy_vs_operator", "safer_at_comparable_accuracy", "n_seeds"])))

# %% [markdown]
# ## The evaluation suite: harmful score per benchmark × judge, over-refusal and capability
# The aligned adapter, the adapter attacked on the first task and each of its fusions under SOMF's five
# harmful-question sets and the field's standard benchmarks (spec/evaluation.md §1; on the tiny profile the world's
# counterparts), each judged by every judge of `evaluation.judges`; `over_refusal` (XSTest's safe prompts refused,
# %) and `capability_<task>` (lm-evaluation-harness multiple choice, %, chance 50). Judge agreement: Cohen's κ.

# %%
suite = pd.DataFrame(write_suite_results(study["suite"], "06_benchmarks", params.profile, ["fusion", "inputs"],
                                         params.evaluation))
display(suite.pivot_table(index="benchmark", columns=["judge", "fusion"], values="harmful_score", sort=False).round(1))
model_level = [m for m in suite_metrics(params.evaluation) if m not in ("harmful_score", "empty")]
display(suite.groupby("fusion", sort=False)[model_level].first().round(1))  # one value per model
display(pd.DataFrame(write_agreement(study["agreement"], "06_judge_agreement", params.profile)).round(3))
if api_usage(study["suite"]):  # an LLM judge: calls, tokens and cost of this run
    display(api_usage(study["suite"]))
fig = plots.benchmark_heatmap(suite, "fusion", f"Harmful score per benchmark, fusions of the "
                              f"{params.fusion.tasks[0]} adapter ({params.profile})")
plots.save(fig, "06_benchmarks", params.profile)

# %% [markdown]
# ## The learned mask's training: DPO loss and keep rate per step

# %%
histories = pd.concat([pd.DataFrame(history).assign(inputs=inputs) for inputs, history in study["histories"].items()])
fig = plots.mask_training(histories, f"Learned safety mask (SOMF), {f.method} adapters ({params.profile})")
plots.save(fig, "06_learned_mask_training", params.profile)

# %%
plots.check_saved(["06_fusion_scatter", "06_learned_mask_training", "06_benchmarks"], params.profile)
print("06_model_fusion: stages built in this run:", run.built_summary())
