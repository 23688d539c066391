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
# # 04 — Safety-critical regions
#
# Which entries of the safety reference's LoRA matrices carry its safety? The reference is the EXPO adapter of
# notebook 03 (α chosen on the validation slice). Its own safe answers to the PKU-SafeRLHF test prompts are the
# calibration set (spec/nlsr.md §2.5); each scorer of the registry (spec §4; merging.md §3) turns them into a
# boolean mask per LoRA matrix, True = safety-critical, kept at density 1 − `mask_sparsity`:
#
# * `low_rank` (NLSR): project each matrix onto the top `rank_keep_ratio` principal directions of its output
#   activations, keep the largest entries of the projection;
# * `wanda` |W|·‖x_j‖ and `snip` |W|·Σ|∇W ℓ| (row-wise), `preference_snip` (DPO loss on preference pairs), their
#   set-difference variants (top-q safety minus top-p utility) and a seeded `random` control.
#
# Row-wise scorers keep ⌈(1 − s)·n⌉ entries of every row, so on rows of r entries the density is ⌈(1 − s)·r⌉ / r.

# %% tags=["parameters"]
params_file = "params/tiny.yaml"  # relative to the repository root; e.g. params/smoke.yaml for a quick check

# %%
import pandas as pd
from IPython.display import Markdown, display

from nlsr_lib import plots
from nlsr_lib.config import load_params
from nlsr_lib.regions import jaccard, layer_density_records, overall_density
from nlsr_lib.results import markdown_table, write_results
from nlsr_lib.runs import Run
from nlsr_lib.stages import notebooks
from nlsr_lib.stages.expo import chosen_alpha
from nlsr_lib.stages.regions import load_stage_mask

params = load_params(params_file)
run = Run(params.profile)
r = params.regions
print(f"profile {params.profile}: mask_sparsity {r.mask_sparsity}, rank_keep_ratio {r.rank_keep_ratio}, "
      f"calibration n={r.calibration.n}, scorers {list(r.scorers)}")
study = notebooks.safety_regions(params, run)


def reference_label(ref) -> str:
    """A reference named by the EXPO candidate it is: ``expo/<mode>/<method>/alpha<α>``."""
    return f"expo/{params.expo.mode}/{ref.tag.removeprefix('reference/')}/alpha{chosen_alpha(ref):g}"

# %% [markdown]
# ## Calibration set of the EXPO-DPO reference

# %%
reference = study["reference"]
display(pd.DataFrame([{"reference": reference_label(reference), **study["calibration"]}]))

# %% [markdown]
# ## A mask for every scorer on the EXPO-DPO reference

# %%
masks, records = {}, []
for scorer, artifact in study["masks"].items():
    masks[scorer] = load_stage_mask(artifact)
    records.append({"scorer": scorer, "reference": reference_label(reference), "mask_sparsity": r.mask_sparsity,
                    "density": overall_density(masks[scorer])})

# %% [markdown]
# ## The low-rank mask of every alignment method's reference

# %%
method_masks = {}
for method, artifact in study["method_masks"].items():
    method_masks[method] = load_stage_mask(artifact)
    records.append({"scorer": "low_rank", "reference": reference_label(study["method_refs"][method]),
                    "mask_sparsity": r.mask_sparsity, "density": overall_density(method_masks[method])})
display(Markdown(markdown_table(records)))

# %% [markdown]
# ## Neuron overlap: Jaccard between scorers and between alignment methods

# %%
def overlaps(named: dict) -> tuple[pd.DataFrame, list[dict]]:
    names = list(named)
    matrix = pd.DataFrame([[jaccard(named[a], named[b]) for b in names] for a in names], index=names, columns=names)
    pairs = [{"a": a, "b": b, "jaccard": float(matrix.loc[a, b])} for i, a in enumerate(names) for b in names[i + 1:]]
    return matrix, pairs


scorer_matrix, scorer_pairs = overlaps(masks)
method_matrix, method_pairs = overlaps(method_masks)
overlap_table = [{"kind": "scorers", **p} for p in scorer_pairs] + [{"kind": "methods", **p} for p in method_pairs]
write_results(records, "04_safety_regions", params.profile,
              columns=["scorer", "reference", "mask_sparsity", "density"])
write_results(overlap_table, "04_overlap", params.profile, columns=["kind", "a", "b", "jaccard"])
display(Markdown(markdown_table(overlap_table)))

# %%
fig = plots.overlap_heatmap(scorer_matrix, f"Mask overlap between scorers (EXPO-DPO reference, {params.profile})")
plots.save(fig, "04_overlap_scorers", params.profile)
fig = plots.overlap_heatmap(method_matrix, f"Low-rank mask overlap between alignment methods ({params.profile})")
plots.save(fig, "04_overlap_methods", params.profile)

# %% [markdown]
# ## Where the safety-only region lies: kept fraction per layer and module type
#
# `low_rank` keeps 1 − s of every matrix and the row-wise scorers 1 − s of every row, so their density is the same
# everywhere by construction. The set difference (top-q SNIP entries for safety that are not top-p for utility)
# is free to concentrate: its density map shows which layers and modules hold safety-specific weights.

# %%
density = pd.DataFrame(layer_density_records(masks["snip_set_difference"]))
fig = plots.density_heatmap(density, f"snip_set_difference mask (EXPO-DPO reference): density per layer "
                                     f"({params.profile})")
plots.save(fig, "04_density_snip_set_difference", params.profile)

# %%
plots.check_saved(["04_overlap_scorers", "04_overlap_methods", "04_density_snip_set_difference"], params.profile)
print("04_safety_regions: stages built in this run:", run.built_summary())
