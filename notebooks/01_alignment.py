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
from nlsr_lib.results import markdown_table, write_seeded_results
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
# ## A few answers of each model

# %%
examples = []
for name, generations in study["generations"].items():
    for row in pd.read_json(generations.path / "generations.json").head(2).itertuples():
        examples.append({"model": name, "prompt": row.prompt, "response": row.response})
pd.DataFrame(examples)

# %%
plots.check_saved(["01_harmful_score_by_method"], params.profile)
assert {r["judge"] for r in rows} == set(params.judges.enabled)
assert {s for r in rows for s in r["seeds"]} == set(params.seeds)
print("01_alignment: table and figure written; stages built in this run:", run.built_summary())
