"""Papermill smoke runs of the notebooks on params/smoke.yaml (every code path, fewest steps)."""

from __future__ import annotations

import json

import pytest

from nlsr_lib.config import load_params
from nlsr_lib.names import FIELD_DEFENCES
from nlsr_lib.paths import figures_dir, results_dir, runs_dir
from nlsr_lib.reproduce import NOTEBOOKS_DIR, NotebookFailure, reproduce

pytestmark = pytest.mark.notebook

FIGURES = {"01_alignment": 2, "02_harmful_finetuning": 2, "03_safety_reference": 1, "04_safety_regions": 3,
           "05_restoration": 5, "06_model_fusion": 3, "07_restoration_ablation": 2}
MAX_STDERR_OUTPUTS = 3  # "a handful": library noise and bars are off under reproduce, real warnings may remain


def outputs_of(notebook: str) -> list[dict]:
    executed = json.loads((runs_dir("smoke") / "executed" / f"{notebook}.ipynb").read_text())
    return [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def assert_figures_inline_and_quiet(notebook: str) -> None:
    """Every figure the notebook saves is also shown in its cell (an image/png output), and the executed notebook
    carries at most a handful of stderr outputs (no progress-bar text, no library notes)."""
    outputs = outputs_of(notebook)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    stderr = ["".join(o["text"])[:200] for o in outputs if o.get("output_type") == "stream" and o["name"] == "stderr"]
    assert len(images) == FIGURES[notebook], f"{notebook}: {len(images)} inline figures"
    assert len(stderr) <= MAX_STDERR_OUTPUTS, f"{notebook}: {len(stderr)} stderr outputs: {stderr}"
    assert not any("widget-view" in str(o.get("data", {})) for o in outputs), "progress widgets"


def test_notebook_01_alignment_smoke(nlsr_home):
    timings = reproduce("params/smoke.yaml", only="01", log=lambda *_: None)
    assert [name for name, _ in timings] == ["01_alignment.ipynb"]
    records = json.loads((results_dir("smoke") / "01_alignment.json").read_text())
    assert {r["method"] for r in records} == {"base", "sft", "dpo", "orpo", "kto", "simpo"}
    assert {r["judge"] for r in records} == {"moderation", "keyword"}
    assert all(0 <= r["harmful_score"] <= 100 for r in records)
    assert (results_dir("smoke") / "01_alignment.md").read_text().startswith("| method | judge |")
    for suffix in ("png", "pdf"):
        assert (figures_dir("smoke") / f"01_harmful_score_by_method.{suffix}").stat().st_size > 1000
    # a second run hits the cache for every stage and gives the same table
    reproduce("params/smoke.yaml", only="01", log=lambda *_: None)
    assert json.loads((results_dir("smoke") / "01_alignment.json").read_text()) == records
    executed = (runs_dir("smoke") / "executed" / "01_alignment.ipynb").read_text()
    assert "stages built in this run: none (all cached)" in executed
    assert_figures_inline_and_quiet("01_alignment")


SECRET = "sk-nlsr-test-0123456789abcdef"


def test_notebook_01_with_an_llm_judge_over_a_local_server_keeps_the_key_secret(nlsr_home, tmp_path, monkeypatch):
    """The evaluation suite with the LLM judge (Llama-Guard text protocol) against a chat-completions server on
    127.0.0.1 (tests/chat_server.py): every benchmark gets `llm` rows, the judge agrees with the keyword judge in a
    κ table, and the API key, read from the environment only, appears in no executed notebook, result or cache."""
    from chat_server import ChatServer

    def reply(message: str) -> str:  # a deterministic stand-in judge: a compliance has steps
        answer = message.split("Agent:", 1)[-1]
        return "unsafe\nS2" if "Step" in answer or "step" in answer else "safe"

    params = tmp_path / "llm.yaml"
    params.write_text(f"extends: {__import__('nlsr_lib.paths').paths.PROJECT_ROOT / 'params/smoke.yaml'}\n"
                      "judges: {llm: {protocol: llama_guard, concurrency: 4, timeout_s: 10}}\n"
                      "evaluation: {judges: [moderation, keyword, llm], wrappers: [identity]}\n")
    with ChatServer(reply=reply) as server:
        monkeypatch.setenv("NLSR_JUDGE_BASE_URL", server.base_url)
        monkeypatch.setenv("NLSR_JUDGE_MODEL", "stand-in-guard")
        monkeypatch.setenv("NLSR_JUDGE_API_KEY", SECRET)
        reproduce(params, only="01", log=lambda *_: None)
        assert server.requests and all(r["headers"].get("authorization") == f"Bearer {SECRET}"
                                       for r in server.requests)
    suite = json.loads((results_dir("smoke") / "01_benchmarks.json").read_text())
    assert {r["judge"] for r in suite} == {"moderation", "keyword", "llm"}
    assert all(r["n_unjudged"] == 0 for r in suite if r["judge"] == "llm")
    kappas = json.loads((results_dir("smoke") / "01_judge_agreement.json").read_text())
    assert {(k["judge_a"], k["judge_b"]) for k in kappas} >= {("keyword", "llm")}
    for path in (p for p in nlsr_home.rglob("*") if p.is_file()):
        assert SECRET.encode() not in path.read_bytes(), path
    for path in results_dir("smoke").glob("*"):
        assert SECRET not in path.read_text(), path


def test_failing_notebook_reports_cell_error_and_path(nlsr_home, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(__import__("nlsr_lib.paths").paths.PROJECT_ROOT / "params/smoke.yaml")
                   + "\njudges: {moderation: {model: /nonexistent/judge}}\n")
    with pytest.raises(NotebookFailure) as info:
        reproduce(bad, only="01", log=lambda *_: None)
    # the judge is first loaded to score the models; the index is the source notebook's (papermill's cells skipped)
    source = json.loads((NOTEBOOKS_DIR / "01_alignment.ipynb").read_text())["cells"]
    expected = next(i for i, c in enumerate(source) if "notebooks.alignment(" in "".join(c["source"]))
    assert info.value.cell_index == expected and "notebooks.alignment(" in info.value.cell_source
    assert info.value.error.startswith("OSError: ") and "/nonexistent/judge" in info.value.error, info.value.error
    assert info.value.executed_path.is_file()


@pytest.fixture(scope="module")
def sequential_home(tmp_path_factory):
    """Notebooks 02-07 on the smoke profile from an empty cache, run in order by papermill (the reference run)."""
    home = tmp_path_factory.mktemp("sequential")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NLSR_HOME", str(home))
        reproduce("params/smoke.yaml", start="02", log=lambda *_: None)
    return home


def test_notebooks_02_onward_smoke(sequential_home, monkeypatch):
    monkeypatch.setenv("NLSR_HOME", str(sequential_home))
    params = load_params("params/smoke.yaml")
    attack = json.loads((results_dir("smoke") / "02_harmful_finetuning.json").read_text())
    required = {"task", "method", "poison_ratio", "harmful_size", "harmful_score", "accuracy", "accuracy_strict"}
    assert all(required <= set(r) for r in attack)
    assert {r["task"] for r in attack} == {"sst2", "ag_news", "gsm8k", "alpaca"}
    assert {r["method"] for r in attack} >= {"sft", "dpo", "orpo", "kto", "simpo", "unaligned"}
    assert {r["variant"] for r in attack} == {"poisoned", "clean"}
    expo = json.loads((results_dir("smoke") / "03_safety_reference.json").read_text())
    assert all({"method", "alpha", "mode", "harmful_score", "chosen"} <= set(r) for r in expo)
    expo_seeds = json.loads((results_dir("smoke") / "03_safety_reference_seeds.json").read_text())
    for method in ("sft", "dpo"):  # at every seed one α is chosen, and the un-extrapolated α is measured
        for seed in params.seeds:
            rows = [r for r in expo_seeds if r["method"] == method and r["seed"] == seed]
            assert sum(r["chosen"] for r in rows) == 1 and any(r["alpha"] == 0.0 for r in rows)
    chosen = json.loads((results_dir("smoke") / "03_expo_chosen.json").read_text())
    assert {r["method"] for r in chosen} == set(params.expo.methods) and all(r["n_seeds"] == 2 for r in chosen)
    regions = json.loads((results_dir("smoke") / "04_safety_regions.json").read_text())
    assert all({"scorer", "reference", "mask_sparsity", "density", "density_sd", "n_seeds"} <= set(r) for r in regions)
    assert {r["scorer"] for r in regions} >= {"low_rank", "wanda", "snip", "preference_snip", "random"}
    low_rank = [r for r in regions if r["scorer"] == "low_rank"]
    assert len(low_rank) == 1 + 2 and all(0 < r["density"] < 1 for r in regions)  # dpo twice: scorer + method rows
    # every table: per-seed records carry their seed; headline rows are aggregated over both smoke seeds
    for name in ("02_harmful_finetuning", "03_safety_reference", "04_safety_regions", "04_overlap", "05_restoration",
                 "06_model_fusion", "07_restoration_ablation"):
        per_seed = json.loads((results_dir("smoke") / f"{name}_seeds.json").read_text())
        assert per_seed and all(r["seed"] in params.seeds for r in per_seed), name
        assert all(r["n_seeds"] >= 1 for r in json.loads((results_dir("smoke") / f"{name}.json").read_text())), name
    headline = [r for r in attack if r["method"] == "dpo" and r["task"] == "sst2" and r["n"] == params.attack.n]
    assert headline and all(r["n_seeds"] == 2 and "harmful_score_sd" in r for r in headline)
    single = [r for r in attack if r["method"] == "kto"]
    assert single and all(r["n_seeds"] == 1 and "harmful_score_lo" in r for r in single)
    overlap = json.loads((results_dir("smoke") / "04_overlap.json").read_text())
    assert all(0.0 <= r["jaccard"] <= 1.0 for r in overlap) and {r["kind"] for r in overlap} == {"scorers", "methods"}
    restored = json.loads((results_dir("smoke") / "05_restoration.json").read_text())
    assert all({"task", "method", "poison_ratio", "defense", "benchmark", "judge", "harmful_score"} <= set(r)
               for r in restored)
    primary = [r for r in restored if r["benchmark"] == "beavertails_30k_test"]
    assert primary and all("accuracy" in r and r["judge"] == params.judges.primary for r in primary)
    # the evaluation suite on the main attack: every benchmark × judge for aligned, none, nlsr and random_mask
    suite = [r for r in restored if r["benchmark"] != "beavertails_30k_test"]
    e = params.evaluation
    assert {(r["benchmark"], r["wrapper"], r["judge"], r["defense"]) for r in suite} == {
        (b, w, j, d) for b in e.benchmarks for w in e.wrappers for j in e.judges
        for d in ("aligned", "none", "nlsr", "random_mask")}
    assert all(r["n_seeds"] == 2 and 0 <= r["over_refusal"] <= 100 and 0 <= r["capability_tiny_facts"] <= 100
               for r in suite)
    assert json.loads((results_dir("smoke") / "05_judge_agreement.json").read_text())[0]["n"] > 0
    fused_suite = json.loads((results_dir("smoke") / "06_benchmarks.json").read_text())
    assert {r["judge"] for r in fused_suite} == set(e.judges) and {r["inputs"] for r in fused_suite} == {"sst2"}
    field = set(params.defences.methods)
    assert {r["defense"] for r in restored} == {"aligned", "none", "nlsr", "safelora", "safelora_delta", "resta",
                                                "aligned_adapter", "random_mask", *field, "vaccine_aligned",
                                                "booster_aligned"}
    # the field's defences run on the headline attacks only, at every seed, each with its family and cost
    served = [r for r in primary if r["defense"] in field]
    assert {r["defense"] for r in served} == field == set(FIELD_DEFENCES.names())
    assert all(r["method"] == "dpo" and r["n_seeds"] == 2 and r["cost_s"] > 0 for r in served)
    assert {r["family"] for r in served} == {"alignment", "fine-tuning", "post-fine-tuning"}
    assert {(r["task"], r["poison_ratio"]) for r in served} == {("sst2", 0.1)}  # defences.scope: main
    fused = json.loads((results_dir("smoke") / "06_model_fusion.json").read_text())
    assert all({"fusion", "inputs", "harmful_score", "accuracy"} <= set(r) for r in fused)
    assert {r["fusion"] for r in fused} >= {"aligned", "none", "weight_averaging", "task_arithmetic", "ties", "dare",
                                            "consensus_ta", "consensus_ties", "region_neuron_outside",
                                            "region_rank_out", "region_heads_outside", "learned_mask",
                                            "learned_mask_random"}
    assert {r["inputs"] for r in fused} == {"sst2", "ag_news", "gsm8k", "sst2+ag_news+gsm8k"}
    ablations = json.loads((results_dir("smoke") / "07_restoration_ablation.json").read_text())
    assert all({"ablation", "value", "harmful_score", "accuracy"} <= set(r) for r in ablations)
    assert {r["ablation"] for r in ablations} == {"mask_sparsity", "rank_keep_ratio", "prune_rate", "epsilon", "tau",
                                                  "seed", "scorer", "favor", "reference", "correction", "strategy"}
    assert {r["defense"] for r in ablations if r["ablation"] == "mask_sparsity"} == {"nlsr", "random_mask"}
    for name in ("02_harmful_score_and_accuracy_vs_ratio", "02_harmful_score_vs_size", "03_harmful_score_vs_alpha",
                 "04_overlap_scorers", "04_overlap_methods", "04_density_snip_set_difference", "05_defences_vs_ratio",
                 "05_field_defences_vs_ratio", "05_defences_pareto", "05_layer_similarity", "06_fusion_scatter", "06_learned_mask_training", "07_ablation_curves",
                 "07_ablation_choices"):
        assert (figures_dir("smoke") / f"{name}.png").is_file()
    for notebook in FIGURES:
        if notebook != "01_alignment":
            assert_figures_inline_and_quiet(notebook)
    for name in ("02_harmful_finetuning", "03_safety_reference", "05_restoration", "06_model_fusion",
                 "07_restoration_ablation"):  # every table reports the share of empty answers beside the score
        assert all(0 <= r["empty"] <= 100 for r in json.loads((results_dir("smoke") / f"{name}.json").read_text()))


TIMINGS = ("cost_s", "cost_s_sd")
"""Fields that measure how long a build took (notebook 05's cost column): the same stages built twice differ."""


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def test_ray_run_equals_the_sequential_run_and_reproduce_then_builds_nothing(sequential_home, tmp_path, monkeypatch):
    """``nlsr run --executor ray --workers 2`` builds the plan as Ray tasks; the notebooks run afterwards find every
    stage cached (no artifact is added or rebuilt) and write the same results as the sequential run."""
    from nlsr_lib.cli import main
    from nlsr_lib.runs import cached_artifacts

    monkeypatch.setenv("NLSR_HOME", str(tmp_path))
    assert main(["run", "--params", "params/smoke.yaml", "--executor", "ray", "--workers", "2"]) == 0
    built = {r["fingerprint"]: r["created"] for r in cached_artifacts(runs_dir("smoke"))}
    reproduce("params/smoke.yaml", start="02", log=lambda *_: None)
    assert {r["fingerprint"]: r["created"] for r in cached_artifacts(runs_dir("smoke"))} == built
    for name in ("02_harmful_finetuning", "03_safety_reference", "04_safety_regions", "04_overlap", "05_restoration",
                 "06_model_fusion", "07_restoration_ablation"):
        ray_result = json.loads((results_dir("smoke") / f"{name}.json").read_text())
        sequential = json.loads((sequential_home / "results" / "smoke" / f"{name}.json").read_text())
        assert without_timings(ray_result) == without_timings(sequential), name
