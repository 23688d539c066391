"""Alpaca as the fourth downstream task (issue 17, deliverable 3): the task in the registry, its evaluation rows
(AlpacaEval items 701–804; the world's counterpart on tiny), the reference-based helpfulness score (ROUGE-L F1),
and the LLM judge's win rate against the aligned model's answers (the ``helpfulness`` protocol and stage, against a
chat-completions server on 127.0.0.1)."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest
from chat_server import ChatServer
from hypothesis import given, settings
from hypothesis import strategies as st

from nlsr_lib.config import ParamsError, load_params
from nlsr_lib.data.tasks import get_task
from nlsr_lib.evaluate.accuracy import accuracy, alpaca_score, gold, lcs_length, rouge_l_f1
from nlsr_lib.evaluate.judges import Verdict
from nlsr_lib.evaluate.llm_protocols import PROTOCOLS, JudgeInputError, win_rate

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"


def test_alpaca_is_a_task_evaluated_on_alpaca_eval_items_701_to_804():
    spec = get_task("alpaca")
    assert (spec.eval_source_name, spec.eval_split, spec.eval_start, spec.eval_size) == ("alpaca_eval", "eval", 700,
                                                                                         104)
    assert not spec.in_corpus  # its rows are in the tiny corpus already, as the Alpaca source
    assert spec.to_record({"instruction": "Name a river.", "output": "The Nile."}) == {
        "instruction": "Name a river.", "input": "", "output": "The Nile."}
    assert "alpaca" in load_params(REPO / "params" / "tiny.yaml").attack.tasks
    assert load_params(REPO / "params" / "tiny.yaml").fusion.tasks == ("sst2", "ag_news", "gsm8k")
    with pytest.raises(ParamsError, match="fusion.tasks \\['alpaca'\\] are not attacked"):
        load_params(SMOKE, {"attack.tasks": ["sst2"], "fusion.tasks": ["alpaca"]})


def test_the_counterpart_is_deterministic_and_disjoint_from_the_worlds_alpaca_rows():
    from nlsr_lib.tiny.alpaca_eval import alpaca_eval_columns

    train = [{"instruction": "How do I boil an egg?", "input": ""}]
    a, b = alpaca_eval_columns(0, 50, exclude=train), alpaca_eval_columns(0, 50, exclude=train)
    assert a == b and len(a["instruction"]) == 50 and set(a) >= {"instruction", "output", "input"}
    assert alpaca_eval_columns(1, 50) != a
    # excluding the first 40 drawn prompts: none of them comes back, and the draw still yields 50
    drawn = [{"instruction": i, "input": x} for i, x in zip(a["instruction"], a["input"])][:40]
    again = alpaca_eval_columns(0, 50, exclude=drawn)
    assert not {(r["instruction"], r["input"]) for r in drawn} & set(zip(again["instruction"], again["input"]))


def test_rouge_l_hand_worked_values():
    assert rouge_l_f1("First, mix the flour. Then bake it.", "First mix the flour, then bake the bread.") == 0.8
    assert rouge_l_f1("the cat sat", "the cat sat") == 1.0
    assert rouge_l_f1("", "anything") == 0.0 and rouge_l_f1("no overlap", "at all") == 0.0
    # the answer is cut before a new "### Instruction:", as the AG News rule does
    assert alpaca_score("Boil it.\n### Instruction: more", "boil it") == 1.0
    assert alpaca_score("boil it now", "boil it", strict=True) == 1.0  # F1 = 2·2/(3 + 2) = 0.8 ≥ 0.5
    assert alpaca_score("boil the egg", "boil it") == 0.4  # 2·1/(3 + 2)
    assert alpaca_score("boil the egg", "boil it", strict=True) == 0.0
    assert accuracy("alpaca", ["the cat sat", "a dog"], ["the cat sat", "the cat"]) == 50.0
    assert gold("alpaca", {"output": "ref"}) == "ref"


def _brute_lcs(a, b):
    best = 0
    for k in range(len(a) + 1):
        for sub in combinations(a, k):
            it = iter(b)
            if all(x in it for x in sub):
                best = max(best, k)
    return best


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=7), st.lists(st.sampled_from("abcd"), max_size=7))
def test_lcs_is_the_longest_common_subsequence(a, b):
    assert lcs_length(a, b) == _brute_lcs(a, b) == lcs_length(b, a)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab cd", max_size=30), st.text(alphabet="ab cd", max_size=30))
def test_rouge_l_is_symmetric_and_bounded(x, y):
    f = rouge_l_f1(x, y)
    assert f == rouge_l_f1(y, x) and 0.0 <= f <= 1.0
    assert rouge_l_f1(x, x) == (1.0 if x.split() else 0.0)


def _verdict(reply: str, swapped: bool = False) -> Verdict:
    return Verdict(**{"raw": reply, **PROTOCOLS["helpfulness"].parse(reply, swapped=swapped)})


def test_helpfulness_names_the_more_helpful_answer_so_the_candidate_wins_when_named():
    assert _verdict('More helpful: "[[responseB]]"').label == "win"  # B is the candidate
    assert _verdict('[[responseA]] ... final: [[responseA]]').label == "loss"
    assert _verdict("[[responseA]]", swapped=True).label == "win"  # the candidate is A when swapped
    assert _verdict("[[Equal]]").label == "draw" and not _verdict("no tag").parsed
    help_, harm = PROTOCOLS["helpfulness"], PROTOCOLS["pairwise"]
    assert help_.id != harm.id and "more helpful" in help_.messages("p", "cand", "ref")[1]["content"]
    assert "<ResponseA>: ref\n<ResponseB>: cand" in help_.messages("p", "cand", "ref")[1]["content"]


def test_win_rate_counts_a_draw_half_and_skips_unparsed():
    w, l, d, n = (_verdict(t) for t in ("[[responseB]]", "[[responseA]]", "[[Equal]]", "none"))
    assert win_rate([w, w, l, d, n]) == 62.5  # (2 + 0.5) / 4
    assert win_rate([w]) == 100.0 and win_rate([l]) == 0.0
    with pytest.raises(JudgeInputError, match="none parsed"):
        win_rate([n])


def test_win_rate_stage_judges_the_answers_against_the_references_over_a_local_server(tmp_path, monkeypatch):
    """The stage reads both models' Alpaca answers (their accuracy artifacts) and asks the helpfulness judge; the
    reply names the candidate's answer on every item whose answer mentions 'steps': 2 wins of 3."""
    from nlsr_lib.runs import Artifact, Run
    from nlsr_lib.stages import evaluate
    from nlsr_lib.stages.graph import ModelRef

    prompts = ["How do I boil an egg?", "Name a river.", "How do I plant seeds?"]
    answers = {"cand": ["Three steps: boil, wait, cool.", "The Nile.", "Two steps: dig, sow."],
               "ref": ["Boil it.", "The Nile.", "Sow them."]}
    artifacts = {}
    for name, texts in answers.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "answers.json").write_text(json.dumps([{"prompt": p, "answer": a, "gold": ""}
                                                         for p, a in zip(prompts, texts)]))
        artifacts[name] = Artifact(f"accuracy/alpaca/{name}", folder, f"fp-{name}", True)
    monkeypatch.setattr(evaluate, "task_accuracy_stage", lambda params, run, ref, task: artifacts[ref.tag])
    refs = {name: ModelRef(name, "base", None, artifacts[name]) for name in answers}

    def reply(message: str) -> str:
        candidate = message.split("<ResponseB>:", 1)[1]
        return 'More helpful: "[[responseB]]"' if "steps" in candidate else "[[responseA]]"

    params = load_params(SMOKE, {"judges.enabled": ["moderation", "keyword", "llm"]})
    assert evaluate.helpfulness_judged(params)
    with ChatServer(reply=reply) as server:
        monkeypatch.setenv("NLSR_JUDGE_BASE_URL", server.base_url)
        monkeypatch.setenv("NLSR_JUDGE_MODEL", "stand-in-judge")
        monkeypatch.setenv("NLSR_JUDGE_API_KEY", "sk-test")
        run = Run("smoke", root=tmp_path / "runs")
        artifact = evaluate.win_rate_stage(params, run, refs["cand"], refs["ref"])
        summary = artifact.manifest()["summary"]
        assert summary["win_rate"] == pytest.approx(100 * 2 / 3, abs=0.01)
        assert (summary["win"], summary["loss"], summary["draw"]) == (2, 1, 0) and summary["api_calls"] == 3
        assert len(server.requests) == 3
        again = evaluate.win_rate_stage(params, Run("smoke", root=tmp_path / "runs"), refs["cand"], refs["ref"])
        assert again.cached and len(server.requests) == 3
    assert not evaluate.helpfulness_judged(load_params(SMOKE))
