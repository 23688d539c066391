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
# # 05 — Restoring safety without retraining
#
# Every attacked adapter of notebook 02 is defended from adapter files alone (spec/nlsr.md §5, §7):
#
# * `nlsr`: per module, the similarity between the fine-tuned and the reference update inside the low-rank safety
#   region of notebook 04; modules are selected for restoration with probability ρ ± ε linear in their similarity
#   rank (less similar, more likely); in selected modules the masked entries take the reference's values;
# * `random_mask`: the same with a random mask of the same size (the control);
# * `safelora` (projection onto the aligned subspace where the cosine is below τ), `resta` (adds γ × the safety
#   vector), `aligned_adapter` (the aligned adapter re-applied wholesale), `none` (the attacked adapter);
# * `safelora_delta`: SafeLoRA projecting only what fine-tuning added to the aligned adapter (the attacked adapter
#   continues the aligned one, so the spec's SafeLoRA also projects the alignment itself);
# * the defences of the field in `defences.methods` (spec/defences.md), on the headline attacks only, by family:
#   alignment stage — `vaccine` (DPO with the worst-case perturbation of size ρ at every layer's attention output)
#   and `booster` (SFT on the pairs' safe answers plus λ × the drop of the harmful loss after a simulated harmful
#   step of length α) retrain the aligned adapter, then the same attack continues it; fine-tuning stage — `lisa`
#   (rounds of guide-data and user steps with a proximal term), `safety_mixing` (⌊n·g⌋ safe BeaverTails rows in
#   place of benign ones, g = 0.1, NLSR's `merge_vlguard_data`), `constrained_sft` (the token-wise constrained loss
#   against the aligned adapter); post-fine-tuning — `antidote` (the top 10 % Wanda scores on harmful calibration
#   rows of every LoRA factor row zeroed).
#
# Rows: `aligned` is the model before the attack. Harmful score on the test slice (primary judge) and the task's
# accuracy (the paper's lenient rule; for Alpaca the reference-based helpfulness of notebook 02, mean ROUGE-L F1 × 100,
# and `win_rate` against the aligned model's answers where an LLM judge is configured). `defences.scope: main` runs the
# field's defences on the main attack only (quick checks). The headline attacks (DPO on SST-2 at every ratio, every task at p = 0.1)
# are defended at every training seed (mean ± sd); the other methods' rows too under `seed_scope: all` (the tiny
# profile), else at the first seed.

# %% tags=["parameters"]
params_file = "params/tiny.yaml"  # relative to the repository root; e.g. params/smoke.yaml for a quick check

# %%
import pandas as pd
from IPython.display import Markdown, display

from nlsr_lib import plots
from nlsr_lib.config import load_params
from nlsr_lib.results import (SUITE_FIELDS, api_usage, markdown_table, suite_metrics, write_agreement,
                             write_seeded_results)
from nlsr_lib.runs import Run
from nlsr_lib.stages import notebooks

params = load_params(params_file)
run = Run(params.profile)
a = params.attack
print(f"profile {params.profile}: defences {list(params.restore.defences)}, strategy {params.restore.strategy} "
      f"(ρ={params.restore.prune_rate}, ε={params.restore.epsilon}, favor {params.restore.favor})")

# %% [markdown]
# ## DPO: every task and poison ratio; every alignment method at one ratio (SST-2)

# %%
study = notebooks.restoration(params, run)  # each attacked adapter: the aligned row, then one row per defence
metrics = ["accuracy", "cost_s", *suite_metrics(params.evaluation)]  # suite rows: over-refusal and capability
if any("win_rate" in r for r in study["records"]):  # the Alpaca task under an LLM judge
    metrics.append("win_rate")
keys = ["task", "method", "poison_ratio", "defense", *SUITE_FIELDS]
rows = write_seeded_results(study["records"], "05_restoration", params.profile, by=keys, metrics=metrics,
                            columns=[*keys, "family", *metrics])
everything = pd.DataFrame(rows)
table = everything[everything.benchmark == notebooks.PRIMARY_SET]  # the primary set (BeaverTails 30k_test)

# %% [markdown]
# ## The main table: DPO on SST-2

# %%
main = table[(table.method == "dpo") & (table.task == "sst2") & (table.family != notebooks.BEFORE_ATTACK)]
display(main.pivot_table(index="defense", columns="poison_ratio", values=["harmful_score", "accuracy"],
                         sort=False).round(1))
field = set(params.defences.methods)
fig = plots.defences_by_ratio(main[~main.defense.isin(field)],
                              f"Training-free defences of the attacked DPO model (SST-2, {params.profile})")
plots.save(fig, "05_defences_vs_ratio", params.profile)
fig = plots.defences_by_ratio(main[main.defense.isin({"aligned", "none", "nlsr", *field})],
                              f"NLSR and the defences of the field, attacked DPO model (SST-2, {params.profile})")
plots.save(fig, "05_field_defences_vs_ratio", params.profile)

# %% [markdown]
# ## Every task at one ratio, every alignment method at another: harmful score / accuracy per defence
#
# `recovery` is the share of the attack's harmful-score rise a defence undoes, (none − defended) / (none − aligned).

# %%
def summary(rows: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    wide = rows.pivot_table(index=index, columns="defense", values=["harmful_score", "accuracy"], sort=False)
    h = wide["harmful_score"]
    rise = h["none"] - h["aligned"]
    nlsr_recovery = ((h["none"] - h["nlsr"]) / rise.where(rise > 0)).rename(("recovery", "nlsr"))
    return pd.concat([wide, nlsr_recovery], axis=1).round(2)


p_main = min(a.poison_ratios, key=lambda p: abs(p - 0.1))  # the paper's main setting, p = 0.1
display(summary(table[(table.method == "dpo") & (table.poison_ratio == p_main)], ["task"]))
display(summary(table[(table.task == "sst2") & (table.poison_ratio == a.methods_ratio)], ["method"]))

# %% [markdown]
# ## NLSR among the defences of the field, by family (DPO, every task at p = 0.1)
# `aligned` and `none` are the references (the model before and after the attack); `vaccine_aligned` and
# `booster_aligned` are the defended aligned models before the attack. `cost_s` is the seconds of the stage the
# defence runs: its alignment (once per aligned model, shared by every attack on it; `aligned`: the plain DPO
# alignment), its fine-tuning (`none`: the plain attack) or its transform (NLSR's also needs the EXPO reference and
# the safety region of notebooks 03–04, once per aligned model, not counted here); measured on this machine by the
# build that made the artifact (one CPU thread per worker on the tiny profile), mean over seeds and tasks.

# %%
at_main = table[(table.method == "dpo") & (table.poison_ratio == p_main)]
by_family = at_main.pivot_table(index=["family", "defense"], columns="task", values=["harmful_score", "accuracy"],
                                sort=False)
by_family["cost_s"] = at_main.groupby(["family", "defense"], sort=False)["cost_s"].mean()
display(by_family.round(1))
fig = plots.defences_pareto(at_main[at_main.family != notebooks.BEFORE_ATTACK],
                            f"Harm vs accuracy of every defence, DPO attacked at p = {p_main:g} ({params.profile})")
plots.save(fig, "05_defences_pareto", params.profile)

# %% [markdown]
# ## The evaluation suite: benchmarks × defences
# The attack of `notebooks.suite_attack` (DPO on the first task at the ratio nearest 0.1) before the attack
# (`aligned`), after it (`none`), restored by NLSR and by the random-mask control, under SOMF's five
# harmful-question sets and the field's standard benchmarks (spec/evaluation.md §1; on the tiny profile the world's
# counterparts), each judged by every judge of `evaluation.judges`; `over_refusal` (XSTest's safe prompts refused,
# %) and `capability_<task>` (lm-evaluation-harness multiple choice, %, chance 50). Judge agreement: Cohen's κ.

# %%
suite = everything[everything.benchmark != notebooks.PRIMARY_SET]
display(suite.pivot_table(index="benchmark", columns=["judge", "defense"], values="harmful_score", sort=False).round(1))
model_level = [m for m in suite_metrics(params.evaluation) if m not in ("harmful_score", "empty")]
display(suite.groupby("defense", sort=False)[model_level].first().round(1))  # one value per model
display(pd.DataFrame(write_agreement(study["agreement"], "05_judge_agreement", params.profile)).round(3))
if api_usage(study["records"]):  # an LLM judge: calls, tokens and cost of this run
    display(api_usage(study["records"]))
method, task, p = notebooks.suite_attack(params)
fig = plots.benchmark_heatmap(suite, "defense", f"Harmful score per benchmark and defence, {method} attacked on "
                              f"{task} at p = {p:g} ({params.profile})", order=plots.DEFENCE_ORDER)
plots.save(fig, "05_benchmarks_defences", params.profile)

# %% [markdown]
# ## Per-layer safety similarity (DPO, SST-2): fine-tuned vs reference update inside the safety region
#
# One panel per poison ratio; marker = module type; filled markers are the modules NLSR restored.

# %%
fig = plots.layer_similarity(pd.DataFrame(study["similarity"]),
                             f"Safety similarity per layer, DPO on SST-2 ({params.profile}); filled = restored")
plots.save(fig, "05_layer_similarity", params.profile)

# %%
plots.check_saved(["05_defences_vs_ratio", "05_field_defences_vs_ratio", "05_defences_pareto", "05_layer_similarity",
                   "05_benchmarks_defences"], params.profile)
print("05_restoration: stages built in this run:", run.built_summary())
