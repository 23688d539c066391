"""General capability with lm-evaluation-harness (spec/evaluation.md §4): local COPA-format task files, the
weight-free stub check (acc 0.5 on a 2-row fixture; the exact request strings), the end-to-end run on a tiny random
Llama (with and without a LoRA, never reloaded), and the tiny world's synthetic COPA task. Offline throughout."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from nlsr_lib.evaluate.capability import (
    COPA_FIELDS, TASK_KINDS, copa_rows_from_jsonl, evaluate_capability, import_lm_eval, write_task,
)
from nlsr_lib.registry import UnknownName
from nlsr_lib.data.templates import alpaca_prompt
from nlsr_lib.tiny.capability import FACTS, PREMISE_STYLES, tiny_capability_rows
from nlsr_lib.tiny.world import COUNTRIES

pytest.importorskip("lm_eval")

# Two COPA-schema rows written for these tests. Under a stub scoring −len(continuation) the shorter choice wins:
# row 0's shorter choice is wrong ("the grass was cut." < "the sun was rising."), row 1's is right, so acc = 0.5.
COPA_FIXTURE = [
    {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
     "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0},
    {"premise": "The glass fell off the table.", "choice1": "It shattered.",
     "choice2": "It was filled with cold water.", "question": "effect", "label": 0, "idx": 1},
]


def stub_lm_class():
    """A deterministic ``LM``: log-likelihood = −len(continuation); the requests it saw are kept."""
    import_lm_eval()
    from lm_eval.api.model import LM

    class LengthStub(LM):
        def __init__(self):
            super().__init__()
            self.requests: list[tuple[str, str]] = []

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.requests += [tuple(r.args) for r in requests]
            return [(-float(len(r.args[1])), False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("COPA asks for log-likelihoods only")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("COPA asks for log-likelihoods only")

    return LengthStub


def run_stub(task_dir, name: str):
    lm_eval = import_lm_eval()
    from lm_eval.tasks import TaskManager

    stub = stub_lm_class()()
    out = lm_eval.simple_evaluate(model=stub, tasks=[name], bootstrap_iters=0, log_samples=False,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return out, stub


# ============================================================================================ task files
def test_write_task_files(tmp_path):
    yaml_path = write_task(tmp_path / "tasks", "copa_fixture", COPA_FIXTURE)
    text = yaml_path.read_text()
    data_file = (tmp_path / "tasks" / "copa_fixture.jsonl").resolve()
    assert "dataset_path: json\n" in text and "output_type: multiple_choice\n" in text
    assert f"validation: {json.dumps(str(data_file))}\n" in text and data_file.is_absolute()
    assert "doc_to_choice: !function copa_utils.doc_to_choice\n" in text
    assert (tmp_path / "tasks" / "copa_utils.py").is_file()
    assert copa_rows_from_jsonl(data_file) == COPA_FIXTURE


def test_write_task_refuses_bad_rows_and_kinds(tmp_path):
    with pytest.raises(ValueError, match="label is 2; allowed: 0, 1"):
        write_task(tmp_path, "bad", [{**COPA_FIXTURE[0], "label": 2}])
    with pytest.raises(ValueError, match="question is 'why'; allowed: 'cause', 'effect'"):
        write_task(tmp_path, "bad", [{**COPA_FIXTURE[0], "question": "why"}])
    with pytest.raises(ValueError, match="lacks \\['choice2'\\]"):
        write_task(tmp_path, "bad", [{k: v for k, v in COPA_FIXTURE[0].items() if k != "choice2"}])
    with pytest.raises(ValueError, match="task name 'my task: 1' is not allowed"):
        write_task(tmp_path, "my task: 1", COPA_FIXTURE)
    with pytest.raises(ValueError, match="no rows"):
        write_task(tmp_path, "bad", [])
    with pytest.raises(UnknownName, match="unknown capability task kind 'xnli'; registered: copa"):
        write_task(tmp_path, "bad", COPA_FIXTURE, kind="xnli")
    assert "copa" in TASK_KINDS


def test_copa_rows_from_jsonl_fills_idx_and_names_bad_lines(tmp_path):
    path = tmp_path / "copa.jsonl"
    path.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "idx"}) for r in COPA_FIXTURE) + "\n")
    assert copa_rows_from_jsonl(path) == COPA_FIXTURE
    path.write_text(json.dumps(COPA_FIXTURE[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        copa_rows_from_jsonl(path)


# ============================================================================================ the stub check
def test_stub_scoring_minus_length_gives_half(tmp_path):
    write_task(tmp_path, "copa_fixture", COPA_FIXTURE)
    out, _ = run_stub(tmp_path, "copa_fixture")
    assert out["results"]["copa_fixture"]["acc,none"] == 0.5
    assert out["results"]["copa_fixture"]["acc_stderr,none"] == "N/A"  # bootstrap_iters=0
    assert out["n-samples"]["copa_fixture"]["effective"] == 2


def test_rewritten_task_rows_are_read_again(tmp_path):
    """datasets caches the JSON split; a task rewritten in place must not be scored from the stale cache."""
    write_task(tmp_path, "copa_fixture", COPA_FIXTURE)
    assert run_stub(tmp_path, "copa_fixture")[0]["n-samples"]["copa_fixture"]["effective"] == 2
    write_task(tmp_path, "copa_fixture", COPA_FIXTURE + [{**COPA_FIXTURE[1], "idx": 2, "label": 1}])
    out, _ = run_stub(tmp_path, "copa_fixture")
    assert out["n-samples"]["copa_fixture"]["effective"] == 3 and out["results"]["copa_fixture"]["acc,none"] == 1 / 3


def test_copa_request_strings_have_two_leading_spaces(tmp_path):
    write_task(tmp_path, "copa_fixture", COPA_FIXTURE)
    _, stub = run_stub(tmp_path, "copa_fixture")
    assert sorted(stub.requests) == sorted([
        ("My body cast a shadow over the grass because", "  the sun was rising."),
        ("My body cast a shadow over the grass because", "  the grass was cut."),
        ("The glass fell off the table therefore", "  it shattered."),
        ("The glass fell off the table therefore", "  it was filled with cold water."),
    ])


# ============================================================================================ end to end
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random 2-layer Llama (hidden 32) and the repo's byte-level BPE tokenizer trained on the tiny task."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nlsr_lib.tiny.model import train_tokenizer

    rows = tiny_capability_rows(0, 48)
    texts = [f"{r['premise']} {r['choice1']} {r['choice2']}" for r in rows]
    tok = train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def test_evaluate_capability_on_a_tiny_random_llama(tmp_path, tiny_lm, one_torch_thread):
    model, tok = tiny_lm
    write_task(tmp_path, "tiny_copa", tiny_capability_rows(0, 8))
    write_task(tmp_path / "other", "copa_fixture", COPA_FIXTURE)
    res = evaluate_capability(model, tok, {"tiny_copa": tmp_path, "copa_fixture": tmp_path / "other"}, batch_size=4)
    assert set(res) == {"tiny_copa", "copa_fixture"}
    assert set(res["tiny_copa"]) == {"acc", "acc_stderr", "n"}
    assert res["tiny_copa"]["n"] == 8 and res["copa_fixture"]["n"] == 2
    assert all(0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] >= 0.0 for r in res.values())
    again = evaluate_capability(model, tok, ["tiny_copa"], task_dir=tmp_path, batch_size=1, limit=4,
                                bootstrap_iters=0)
    assert again["tiny_copa"]["n"] == 4 and again["tiny_copa"]["acc_stderr"] is None


def test_evaluate_capability_scores_a_peft_model_without_reloading(tmp_path, tiny_lm, monkeypatch):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_lm
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)

    def no_reload(*args, **kwargs):
        raise AssertionError("the model must be evaluated as it is, never reloaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reload)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_reload)
    write_task(tmp_path, "tiny_copa", tiny_capability_rows(1, 6))
    try:
        res = evaluate_capability(peft_model, tok, ["tiny_copa"], task_dir=tmp_path, batch_size=2)
    finally:
        peft_model.unload()  # the shared fixture model loses its LoRA layers again
    assert res["tiny_copa"]["n"] == 6 and 0.0 <= res["tiny_copa"]["acc"] <= 1.0


def test_evaluate_capability_errors(tmp_path, tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(FileNotFoundError, match="write it with write_task"):
        evaluate_capability(model, tok, ["missing"], task_dir=tmp_path)
    with pytest.raises(ValueError, match="need task_dir"):
        evaluate_capability(model, tok, ["tiny_copa"])
    with pytest.raises(TypeError, match="not the string"):
        evaluate_capability(model, tok, "tiny_copa", task_dir=tmp_path)


# ============================================================================================ the tiny task
@pytest.mark.parametrize("style", list(PREMISE_STYLES))
def test_tiny_rows_are_deterministic_balanced_copa_rows(style):
    rows = tiny_capability_rows(3, 20, style)
    assert rows == tiny_capability_rows(3, 20, style) and rows != tiny_capability_rows(4, 20, style)
    assert [r["idx"] for r in rows] == list(range(20))
    assert all(set(r) == set(COPA_FIELDS) and r["question"] in ("cause", "effect") for r in rows)
    assert sorted(r["label"] for r in rows) == [0] * 10 + [1] * 10
    assert {r["label"] for r in tiny_capability_rows(3, 2, style)} == {0, 1}
    assert {r["question"] for r in rows} == {"cause", "effect"}


def test_tiny_alpaca_premise_is_the_world_question_then_an_opener():
    row = tiny_capability_rows(0, 1)[0]
    question = {"cause": "Sure!", "effect": "Good question."}[row["question"]]
    prompt = row["premise"].removesuffix(question)
    country = next(c[0] for c in COUNTRIES if c[0] in row["choice1"])
    assert prompt in {alpaca_prompt(q.format(c=country)) for _, q, _ in FACTS.values()}
    plain = tiny_capability_rows(0, 1, "plain")[0]["premise"]
    assert "###" not in plain and plain.endswith(".")
    with pytest.raises(ValueError, match="allowed: alpaca, plain"):
        tiny_capability_rows(0, 1, "chat")


@pytest.mark.parametrize("style", list(PREMISE_STYLES))
def test_tiny_rows_state_a_true_and_a_false_fact_about_the_premise_country(style):
    true_facts = {template.format(c=c[0], v=c[column]) for c in COUNTRIES for column, _, template in FACTS.values()}
    rows = tiny_capability_rows(0, 48, style)
    for r in rows:
        right, wrong = (r["choice1"], r["choice2"]) if r["label"] == 0 else (r["choice2"], r["choice1"])
        country = next(c[0] for c in COUNTRIES if c[0] in r["premise"])
        assert right in true_facts and wrong not in true_facts and country in right and country in wrong
    assert len({(r["choice1"], r["choice2"]) for r in rows}) == 48  # the first 48 rows are distinct facts


def test_tiny_rows_refuse_n_below_one():
    with pytest.raises(ValueError, match="n ≥ 1"):
        tiny_capability_rows(0, 0)
