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
# # 01 — Safety alignment
#
# Align the base model for safety with LoRA (spec/nlsr.md §1.1–1.2): an **SFT** LoRA on safe BeaverTails
# answers, merged into **W_sft**, then **DPO, ORPO, KTO and SimPO** LoRAs trained on W_sft with
# PKU-SafeRLHF preference data. Each model answers the unsafe BeaverTails test prompts; the **harmful score**
# is the percentage of answers flagged by the moderation classifier (beaver-dam-7b's interface) and, beside
# it, by keyword refusal matching.
#
# Every heavy step is a cached stage of `nlsr_lib.stages`; `stages.notebooks.alignment` requests all of them (the
# same call `nlsr plan` and `nlsr run` read), so re-running this notebook, or running it after `nlsr run`, reuses
# them.

# %% tags=["parameters"]
params_file = "params/tiny.yaml"  # relative to the repository root; e.g. params/smoke.yaml for a quick check

# %%
import pandas as pd
from IPython.display import Markdown, display

from nlsr_lib import plots
from nlsr_lib.config import load_params
from nlsr_lib.results import (api_usage, markdown_table, suite_metrics, write_agreement, write_seeded_results,
                             write_suite_results)
from nlsr_lib.runs import Run
from nlsr_lib.stages import notebooks

params = load_params(params_file)
run = Run(params.profile)
print(f"profile {params.profile}: model {params.model.name}, alignment methods {params.alignment.methods}, "
      f"training seeds {params.seeds}")
study = notebooks.alignment(params, run)

# %% [markdown]
# ## Base model and moderation judge
# Tiny profile: a BPE tokenizer and a Llama pretrained from scratch on the synthetic world, and a small
# moderation classifier trained on the world's labelled QA pairs. Real profiles point at hub models instead.

# %%
display(pd.DataFrame([{"stage": "base_model", **study["base"]}, {"stage": "moderation", **study["moderation"]}]))

# %% [markdown]
# ## Alignment: SFT → W_sft, then one preference LoRA per method on W_sft, at every training seed

# %%
display(pd.DataFrame(study["aligned"]))

# %% [markdown]
# ## Harmful score of each model under each judge
# Mean ± sd over the training seeds (the base model is not trained: the same at every seed); the JSON also holds
# a 95 % bootstrap interval over seeds and prompts (`harmful_score_lo`, `_hi`) and the per-seed records
# (`01_alignment_seeds.json`).

# %%
columns = ["method", "judge", "harmful_score", "empty", "n_prompts"]  # empty: % of empty answers (never safe)
rows = write_seeded_results(study["records"], "01_alignment", params.profile, by=["method", "judge"],
                            metrics=["harmful_score", "empty"], columns=columns)
table = pd.DataFrame(rows)
display(Markdown(markdown_table(rows, [*columns, "n_seeds"])))

# %%
pivot = table.pivot(index="method", columns="judge", values="harmful_score").reindex(
    [m for m in plots.METHOD_ORDER if m in set(table["method"])])
pivot

# %%
fig = plots.harmful_score_by_method(
    table, f"Harmful score by alignment method ({params.profile}, {rows[0]['n_prompts']} unsafe test prompts)")
plots.save(fig, "01_harmful_score_by_method", params.profile)

# %% [markdown]
# ## The evaluation suite: harmful score per benchmark × judge, over-refusal and capability
# SOMF's five harmful-question sets and the field's standard benchmarks (spec/evaluation.md §1; on the tiny profile
# the world's counterparts, with the real sets' schema and categories), each judged by every judge of
# `evaluation.judges`; `over_refusal`: the share of XSTest's safe prompts refused (%, XSTest's string match; the
# tiny counterpart's safe prompts look unsafe); `capability_<task>`: lm-evaluation-harness multiple-choice accuracy
# (%, chance 50). Judge agreement: Cohen's κ on the same responses, with a 95 % bootstrap interval.

# %%
suite = pd.DataFrame(write_suite_results(study["suite"], "01_benchmarks", params.profile, ["method"],
                                         params.evaluation))
display(suite.pivot_table(index="benchmark", columns=["judge", "method"], values="harmful_score", sort=False).round(1))
model_level = [m for m in suite_metrics(params.evaluation) if m not in ("harmful_score", "empty")]
display(suite.groupby("method", sort=False)[model_level].first().round(1))  # one value per model
display(pd.DataFrame(write_agreement(study["agreement"], "01_judge_agreement", params.profile)).round(3))
if api_usage(study["suite"]):  # an LLM judge: calls, tokens and cost of this run
    display(api_usage(study["suite"]))
fig = plots.benchmark_heatmap(suite, "method", f"Harmful score per benchmark, aligned models ({params.profile})",
                              order=["base", *plots.METHOD_ORDER])
plots.save(fig, "01_benchmarks", params.profile)

# %% [markdown]
# ## A few answers of each model

# %%
examples = []
for name, generations in study["generations"].items():
    for row in pd.read_json(generations.path / "generations.json").head(2).itertuples():
        examples.append({"model": name, "prompt": row.prompt, "response": row.response})
pd.DataFrame(examples)

# %%
plots.check_saved(["01_harmful_score_by_method", "01_benchmarks"], params.profile)
assert {r["judge"] for r in rows} == set(params.judges.enabled)
assert {s for r in rows for s in r["seeds"]} == set(params.seeds)
print("01_alignment: table and figure written; stages built in this run:", run.built_summary())
