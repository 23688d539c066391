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
# # 02 — The harmful fine-tuning attack
#
# The aligned adapter is trained further on a downstream task whose data hides ⌊n·p⌋ harmful examples
# (spec/nlsr.md §1.1 stage 6, §2.4). We measure the **harmful score** on the unsafe test prompts and the **task
# accuracy** (the paper's lenient rule and a strict rule beside it, §6.2):
#
# * DPO on every task across poison ratios p ∈ {0, 0.01, 0.05, 0.1, 0.2, 0.3}, and the clean control (safe rows
#   instead of harmful ones);
# * every alignment method (and the unaligned base) at one ratio;
# * DPO on SST-2 across mixture sizes n at a fixed ratio.
#
# Alpaca (the instruction-following task of the Vaccine/Lisa/Booster/Antidote harness) is scored on AlpacaEval's
# items 701–804 (on the tiny profile, the world's counterpart: held-out benign requests with reference answers) by a
# reference-based helpfulness score that needs no API: its "accuracy" is the mean ROUGE-L F1 × 100 of the answer
# against the reference (strict: the share with F1 ≥ 0.5). Where an LLM judge is enabled, `win_rate` beside it is
# the judge's helpfulness preference against the aligned model's answers (a draw counts half).
#
# The headline rows (DPO on SST-2 at every ratio, on every task at p = 0.1, with the clean controls) are trained at
# every training seed of `params.seeds` and reported as mean ± sd; the other rows too under `seed_scope: all` (the
# tiny profile), else at the first seed, with a 95 % bootstrap interval over prompts.

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
a = params.attack
print(f"profile {params.profile}: n={a.n}, ratios {a.poison_ratios}, sizes {a.sizes}, tasks {a.tasks}, "
      f"training seeds {params.seeds}")

# %% [markdown]
# Every attacked model, in the order of `stages.attack.attack_points`: DPO on every task at every ratio with the
# clean control (safe rows instead of harmful ones); every other alignment method (and the unaligned base) on
# SST-2 at `attack.methods_ratio`; DPO on SST-2 at every other mixture size. Each is trained, then measured:
# harmful score (primary judge) and task accuracy (`stages.evaluate.measure`); `stages.attack.headline_points` at
# every training seed.

# %%
study = notebooks.harmful_finetuning(params, run)
records = study["records"]

# %% [markdown]
# ## Before the attack: the DPO-aligned model on each task

# %%
pd.DataFrame(write_seeded_results(study["before"], "02_before_attack", params.profile, by=["task", "method"],
                                  metrics=["accuracy", "accuracy_strict"]))

# %%
columns = ["task", "method", "variant", "poison_ratio", "n", "harmful_size", "harmful_score", "empty", "accuracy",
           "accuracy_strict"]
metrics = ["harmful_score", "empty", "accuracy", "accuracy_strict"]
if any("win_rate" in r for r in records):  # the Alpaca task under an LLM judge
    metrics.append("win_rate")
    columns.append("win_rate")
rows = write_seeded_results(records, "02_harmful_finetuning", params.profile,
                            by=["task", "method", "variant", "poison_ratio", "n"], metrics=metrics, columns=columns)
table = pd.DataFrame(rows)
display(Markdown(markdown_table(rows, [*columns, "n_seeds"])))

# %%
fig = plots.attack_by_ratio(table[(table.method == "dpo") & (table.variant == "poisoned") & (table.n == a.n)],
                            f"Harmful fine-tuning of the DPO-aligned model ({params.profile}, n={a.n})")
plots.save(fig, "02_harmful_score_and_accuracy_vs_ratio", params.profile)

# %%
sizes = table[(table.method == "dpo") & (table.task == "sst2") & (table.variant == "poisoned")
              & (table.poison_ratio == a.size_sweep_ratio)]
fig = plots.attack_by_size(sizes, f"DPO, SST-2, p={a.size_sweep_ratio}: harmful score vs mixture size")
plots.save(fig, "02_harmful_score_vs_size", params.profile)

# %%
plots.check_saved(["02_harmful_score_and_accuracy_vs_ratio", "02_harmful_score_vs_size"], params.profile)
print("02_harmful_finetuning: stages built in this run:", run.built_summary())
