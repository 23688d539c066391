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
# Masks are computed at every training seed (each seed's own references); the density map is the first seed's.

# %% tags=["parameters"]
params_file = "params/tiny.yaml"  # relative to the repository root; e.g. params/smoke.yaml for a quick check

# %%
import pandas as pd
from IPython.display import Markdown, display

from nlsr_lib import plots
from nlsr_lib.config import load_params
from nlsr_lib.regions import jaccard, layer_density_records, overall_density
from nlsr_lib.results import markdown_table, write_seeded_results
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
# ## Calibration set of the EXPO-DPO reference (first training seed)

# %%
reference = study["reference"]
display(pd.DataFrame([{"reference": reference_label(reference), **study["calibration"]}]))

# %% [markdown]
# ## Masks at every training seed: every scorer on the EXPO-DPO reference, the low-rank mask of every method's
# reference, and the neuron overlap (Jaccard) between them
# Each training seed has its own aligned adapters, so its own references (α chosen again) and masks; the tables
# report mean ± sd over seeds, the heatmaps the mean Jaccard matrix.

# %%
def overlaps(named: dict) -> tuple[pd.DataFrame, list[dict]]:
    names = list(named)
    matrix = pd.DataFrame([[jaccard(named[a], named[b]) for b in names] for a in names], index=names, columns=names)
    pairs = [{"a": a, "b": b, "jaccard": float(matrix.loc[a, b])} for i, a in enumerate(names) for b in names[i + 1:]]
    return matrix, pairs


records, overlap_records, matrices = [], [], {"scorers": [], "methods": []}
for seed, replica in study["replicates"].items():
    sets = {"scorers": {scorer: load_stage_mask(a) for scorer, a in replica["masks"].items()},
            "methods": {method: load_stage_mask(a) for method, a in replica["method_masks"].items()}}
    if seed == params.seeds[0]:
        masks = sets["scorers"]
    references = {"scorers": {scorer: replica["reference"] for scorer in sets["scorers"]},
                  "methods": replica["method_refs"]}
    for kind, named in sets.items():
        records += [{"kind": kind, "scorer": name if kind == "scorers" else "low_rank",
                     "reference": references[kind][name].tag.removeprefix("reference/"),
                     "alpha": chosen_alpha(references[kind][name]), "mask_sparsity": r.mask_sparsity,
                     "density": overall_density(mask), "seed": seed} for name, mask in named.items()]
        matrix, pairs = overlaps(named)
        matrices[kind].append(matrix)
        overlap_records += [{"kind": kind, **pair, "seed": seed} for pair in pairs]
rows = write_seeded_results(records, "04_safety_regions", params.profile, by=["kind", "scorer", "reference"],
                            metrics=["density"], columns=["kind", "scorer", "reference", "alpha", "mask_sparsity",
                                                          "density"])
display(Markdown(markdown_table(rows, ["kind", "scorer", "reference", "alpha", "density", "n_seeds"])))
overlap = write_seeded_results(overlap_records, "04_overlap", params.profile, by=["kind", "a", "b"],
                               metrics=["jaccard"], columns=["kind", "a", "b", "jaccard"])
display(Markdown(markdown_table(overlap, ["kind", "a", "b", "jaccard", "n_seeds"])))

# %%
n = len(params.seeds)
mean_matrix = {kind: sum(ms) / len(ms) for kind, ms in matrices.items()}
fig = plots.overlap_heatmap(mean_matrix["scorers"], f"Mask overlap between scorers (EXPO-DPO reference, "
                                                    f"{params.profile}, mean over {n} seeds)")
plots.save(fig, "04_overlap_scorers", params.profile)
fig = plots.overlap_heatmap(mean_matrix["methods"], f"Low-rank mask overlap between alignment methods "
                                                    f"({params.profile}, mean over {n} seeds)")
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
