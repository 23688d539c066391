"""The evaluation suite's stages (nlsr_lib/stages/suite.py): where prompts come from, what the judges see, what a
notebook plans, and how the suite's rows become tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nlsr_lib.config import ParamsError, load_params
from nlsr_lib.intervals import size_field
from nlsr_lib.results import api_usage, suite_metrics
from nlsr_lib.stages.suite import benchmark_prompts, benchmark_source

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMOKE = load_params("params/smoke.yaml")
TINY = load_params("params/tiny.yaml")


def with_evaluation(params, **changes):
    return dataclasses.replace(params, evaluation=dataclasses.replace(params.evaluation, **changes))


def test_tiny_profiles_read_the_worlds_counterparts():
    assert benchmark_source(TINY) == benchmark_source(SMOKE) == "world"
    records = benchmark_prompts(TINY, "somf_catqa")
    assert len(records) == TINY.evaluation.tiny_size and all(r.benchmark == "somf_catqa" for r in records)
    assert records == benchmark_prompts(TINY, "somf_catqa")  # a pure function of the world's seed


def test_harmbench_copyright_rows_are_not_sent_and_limit_keeps_the_first():
    """spec/evaluation.md §1.2 (c): copyright rows need MinHash files that are not here, so they are not judged."""
    records = benchmark_prompts(TINY, "harmbench_test")
    assert records and all(r.meta.get("judgeable", True) for r in records)
    assert len(records) < TINY.evaluation.tiny_size  # the counterpart has copyright rows too
    assert benchmark_prompts(with_evaluation(TINY, limit=3), "harmbench_test") == records[:3]


def test_a_wrapper_changes_what_the_model_is_sent_not_what_the_judges_see():
    """spec/evaluation.md §3: wrap before the chat template, judge against the original prompt."""
    plain = benchmark_prompts(TINY, "advbench")
    wrapped = benchmark_prompts(TINY, "advbench", "refusal_suppression")
    for p, w in zip(plain, wrapped):
        assert w.behavior == p.behavior and w.prompt != p.prompt and p.prompt in w.prompt
        assert w.id == f"{p.id}@refusal_suppression" and w.meta["wrapper"] == "refusal_suppression"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (the local benchmark copies) is absent")
def test_a_real_profile_reads_the_local_copies():
    real = with_evaluation(TINY, data_dir=str(SHARED_DATA))
    assert benchmark_source(real) == "local"
    assert len(benchmark_prompts(real, "advbench")) == 520
    harmbench = benchmark_prompts(real, "harmbench_test")
    assert len(harmbench) == 240  # 320 rows less the 80 copyright ones (spec §1.2 (c))
    contextual = [r for r in harmbench if r.meta["FunctionalCategory"] == "contextual"]
    assert len(contextual) == 81 and all("\n\n---\n\n" in r.prompt and r.behavior in r.prompt for r in contextual)


def test_evaluation_params_are_checked():
    with pytest.raises(ParamsError, match="over-refusal set"):
        dataclasses.replace(TINY.evaluation, benchmarks=("advbench", "xstest"))
    with pytest.raises(ParamsError, match="names a benchmark twice"):
        dataclasses.replace(TINY.evaluation, benchmarks=("advbench", "advbench"))


def test_relative_evaluation_folders_resolve_against_the_params_file(tmp_path):
    (tmp_path / "copies").mkdir()
    path = tmp_path / "p.yaml"
    path.write_text(f"extends: {Path('params/smoke.yaml').resolve()}\nevaluation: {{data_dir: ./copies}}\n")
    assert load_params(path).evaluation.data_dir == str((tmp_path / "copies").resolve())


def test_the_suite_is_planned_for_notebooks_01_05_06():
    from nlsr_lib.stages.plan import collect

    plan = collect(SMOKE, ["05"])
    kinds = [node.kind for node in plan.nodes]
    e = SMOKE.evaluation
    # aligned, none, nlsr and random_mask at every training seed (each seed trains its own), each with every
    # benchmark × wrapper and the over-refusal set
    models = 4 * len(SMOKE.seeds)
    assert kinds.count("benchmark_generations") == models * (len(e.benchmarks) * len(e.wrappers) + 1)
    assert kinds.count("over_refusal") == kinds.count("capability") == models


def test_suite_metrics_and_their_interval_sizes():
    assert suite_metrics(TINY.evaluation) == ["harmful_score", "empty", "over_refusal", "capability_tiny_facts"]
    assert size_field("over_refusal") == "n_over_refusal"
    assert size_field("capability_tiny_facts") == "n_capability_tiny_facts"
    assert suite_metrics(dataclasses.replace(TINY.evaluation, over_refusal="", capability=())) == [
        "harmful_score", "empty"]


def test_api_usage_sums_an_llm_judges_calls_and_is_none_without_one():
    rows = [{"judge": "llm", "api_calls": 3, "api_cost": 0.5}, {"judge": "keyword"},
            {"judge": "llm", "api_calls": 2, "api_cost": 0.25}]
    assert api_usage(rows) == {"api_calls": 5, "api_cost": 0.75}
    assert api_usage([{"judge": "keyword"}]) is None
