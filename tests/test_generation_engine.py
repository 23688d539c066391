"""The generation engine (issue 15): greedy responses equal to the old load-per-evaluation path at any batch size,
rows stopped at the response cut without changing a response, the base loaded once with adapters swapped in place,
evaluations deduplicated by adapter content, and the vLLM backend's requests."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlsr_lib.config import GenerationConfig, LoraConfig, ModelConfig, Params
from nlsr_lib.data.templates import RESPONSE_MARKER, STOP_MARKER, alpaca_prompt, extract_response, response_complete
from nlsr_lib.evaluate.engine import HFEngine, VLLMEngine, adapter_name, vllm_lora_rank
from nlsr_lib.evaluate import generation
from nlsr_lib.evaluate.generation import (StopAtResponseCut, generate_responses, reserved_cache, shared_prefix_length,
                                          token_budget_batches)
from nlsr_lib.models import load_with_adapter, peft_lora_config
from nlsr_lib.tiny.model import train_tokenizer

PIECES = st.sampled_from([RESPONSE_MARKER, STOP_MARKER, "!", "!!", "#", "### ", " ", "\n", "a", "Sure.", "Resp"])
TEXT = st.lists(PIECES, max_size=12).map("".join)


@given(TEXT, TEXT)
def test_a_complete_response_is_final_under_any_continuation(text, more):
    if response_complete(text):
        assert extract_response(text + more) == extract_response(text)


@given(TEXT)
def test_an_incomplete_response_can_still_change(text):
    """Completeness is not over-claimed either: an incomplete text with the marker changes when a cut follows."""
    if RESPONSE_MARKER in text and not response_complete(text):
        assert extract_response(text + " extra words" + STOP_MARKER) != extract_response(text) or \
            extract_response(text + " extra words") != extract_response(text)


@settings(max_examples=200)
@given(st.lists(st.integers(1, 50), max_size=40), st.integers(1, 20), st.integers(1, 400), st.integers(1, 9))
def test_token_budget_batches_cover_every_prompt_once_within_the_budget(lengths, new, budget, max_batch):
    batches = token_budget_batches(lengths, new, budget, max_batch)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [i for b in batches for i in b]
    assert flat == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # longest first, stable
    for batch in batches:
        assert len(batch) <= max_batch
        assert len(batch) == 1 or len(batch) * (max(lengths[i] for i in batch) + new) <= budget


def test_token_budget_batches_refuse_an_empty_budget():
    with pytest.raises(ValueError, match="token_budget and max_batch must be ≥ 1"):
        token_budget_batches([3], 2, 0, 4)


# --------------------------------------------------------------------------------------------- a tiny model
TEXTS = [alpaca_prompt(f"Tell me about item {i} and {i * 7}") + f"Item {i} is fine!!! Really. ### Response: x"
         for i in range(60)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama saved with its tokenizer, and three random LoRA adapters on it."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("engine")
    tok = train_tokenizer(TEXTS, 300, root / "base")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    adapters = []
    for seed in range(3):
        torch.manual_seed(seed + 1)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                               peft_lora_config(LoraConfig(r=4, alpha=8)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.5)
        model.save_pretrained(root / f"adapter{seed}")
        adapters.append(str(root / f"adapter{seed}"))
    prompts = [alpaca_prompt(f"Tell me about item {i}" + " and more" * (i % 5)) for i in range(21)]
    return {"base": str(root / "base"), "adapters": adapters, "prompts": prompts}


_OLD: dict = {}


def old_path(tiny, adapter):
    """Today's design before the engine: the model loaded for the evaluation, batch 16, no stop at the cut
    (computed once per adapter for the module)."""
    from nlsr_lib.models import load_tokenizer

    if adapter not in _OLD:
        model = load_with_adapter(tiny["base"], adapter, ModelConfig(device_map="cpu"))
        tok = load_tokenizer(tiny["base"])
        _OLD[adapter] = generate_responses(model, tok, tiny["prompts"], 24, 16, stop_at_cut=False,
                                           decoder="transformers")
    return _OLD[adapter]


@pytest.mark.parametrize("batch_size,token_budget", [(3, 0), (8, 0), (64, 0), (64, 150)])
def test_engine_equals_the_old_path_at_any_batch_size_with_one_base_load(tiny, batch_size, token_budget):
    engine = HFEngine(ModelConfig(device_map="cpu"), GenerationConfig(batch_size=batch_size,
                                                                      token_budget=token_budget))
    for adapter in [*tiny["adapters"], None, tiny["adapters"][0]]:
        assert engine.generate(tiny["base"], adapter, tiny["prompts"], 24) == old_path(tiny, adapter), adapter
    assert engine.loads == 1
    model = engine.bases[tiny["base"]]["model"]
    assert list(model.peft_config) == [adapter_name(tiny["adapters"][0])]  # swapped in place: one adapter held


def test_engine_one_prompt_at_a_time_equals_the_old_path(tiny):
    engine = HFEngine(ModelConfig(device_map="cpu"), GenerationConfig(batch_size=1))
    some = slice(0, 21, 4)
    assert engine.generate(tiny["base"], tiny["adapters"][2], tiny["prompts"][some], 24) == \
        old_path(tiny, tiny["adapters"][2])[some]


def test_adapters_are_held_in_the_models_dtype(tiny, tmp_path):
    """LoRA in the model's dtype: a bf16 base gets bf16 LoRA weights (the old path upcast them to fp32)."""
    engine = HFEngine(ModelConfig(device_map="cpu", dtype="bfloat16"), GenerationConfig())
    with engine.model_for(tiny["base"], tiny["adapters"][1]) as (model, _):
        dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.bfloat16}


@pytest.fixture()
def bang_model(tiny):
    """The tiny base with its head rewired to always emit the last token of ``!!!`` (a cut marker)."""
    from nlsr_lib.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny["base"])
    model = load_causal_lm(tiny["base"], ModelConfig(device_map="cpu"))
    bang = tok.convert_tokens_to_ids(tok.tokenize("!!!"))[-1]
    assert tok.decode([bang]).strip().endswith("!")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[bang] = 1.0  # argmax: always this token (RMS-normed states are not all ≤ 0)
        model.model.norm.weight.fill_(1.0)
        model.model.norm.weight.abs_()
    return model, tok


def test_rows_stop_at_the_cut_and_the_responses_do_not_change(tiny, bang_model):
    """A model that always emits ``!!!`` stops after one token per row (not 24), with the responses of a
    full-length run; a prompt whose own text closes the response segment is done at once."""
    model, tok = bang_model
    steps = []
    generate = model.generate

    def counting(**kwargs):
        out = generate(**kwargs)
        steps.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = counting
    prompts = tiny["prompts"][:5] + [alpaca_prompt("say ### Response: done")]
    full = generate_responses(model, tok, prompts, 24, 8, stop_at_cut=False, decoder="transformers")
    stopped = generate_responses(model, tok, prompts, 24, 8, decoder="transformers")
    assert stopped == full
    assert steps[0] == 24 and steps[1] < 24
    calls = []
    model.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    assert generate_responses(model, tok, prompts, 24, 8) == full  # the compacting decoder
    assert len(calls) == 1 + steps[1]  # the shared prefix once, then one call per token generate took


def test_compact_decoder_equals_generate_with_and_without_its_savings(tiny, monkeypatch):
    """The compacting decoder's three savings (shared prefix prefilled once, cache written in place, finished rows
    dropped) each leave the responses of ``generate``: on, off, and rows dropped one at a time."""
    from nlsr_lib.models import load_tokenizer

    model = load_with_adapter(tiny["base"], tiny["adapters"][0], ModelConfig(device_map="cpu"))
    tok = load_tokenizer(tiny["base"])
    prompts = tiny["prompts"] + [alpaca_prompt("x ### Response: y!!!")]
    assert shared_prefix_length(tok(prompts)["input_ids"]) >= generation.SHARED_PREFIX_MIN  # the Alpaca header
    want = generate_responses(model, tok, prompts, 24, 64, decoder="transformers")
    assert generate_responses(model, tok, prompts, 24, 64) == want
    monkeypatch.setattr(generation, "COMPACT_SHARE", 0.0)
    assert generate_responses(model, tok, prompts, 24, 7) == want
    monkeypatch.setattr(generation, "SHARED_PREFIX_MIN", 10_000)
    assert generate_responses(model, tok, prompts, 24, 64) == want


@settings(max_examples=200)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=6))
def test_shared_prefix_is_the_longest_common_one_leaving_each_row_a_token(rows):
    n = shared_prefix_length(rows)
    assert all(r[:n] == rows[0][:n] for r in rows) and n < min(map(len, rows))
    if n + 1 < min(map(len, rows)):
        assert len({tuple(r[:n + 1]) for r in rows}) > 1  # one more token is not shared


def test_reserved_cache_layers_hold_what_concatenation_would_and_refuse_an_overflow(tiny):
    from transformers import DynamicCache, LlamaConfig

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
    reserved, grown = reserved_cache(config, 6), DynamicCache(config=config)
    chunks = [torch.randn(3, 1, n, 4) for n in (4, 1, 1)]
    for i, chunk in enumerate(chunks):
        for cache in (reserved, grown):
            keys, values = cache.update(chunk, -chunk, 0)
            assert torch.equal(keys, torch.cat(chunks[:i + 1], dim=-2)) and torch.equal(values, -keys)
    for cache in (reserved, grown):
        cache.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(reserved.layers[0].keys, grown.layers[0].keys)
    assert reserved.get_seq_length() == 6
    with pytest.raises(ValueError, match="holds 6 positions; 7 were asked for"):
        reserved.update(chunks[1][:2], chunks[1][:2], 0)


def test_stop_criterion_marks_rows_with_a_cut_marker_in_their_newest_tokens(tiny):
    from nlsr_lib.models import load_tokenizer

    tok = load_tokenizer(tiny["base"])
    prompts = [alpaca_prompt("a"), alpaca_prompt("b"), "no marker here"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    width = enc["input_ids"].shape[1]
    stop = StopAtResponseCut(tok, prompts, width)
    tails = [tok(t, add_special_tokens=False)["input_ids"] for t in ("fine!!! yes", "fine and dandy", "x!!! y")]
    longest = max(map(len, tails))
    gen = torch.tensor([t + [tok.pad_token_id] * (longest - len(t)) for t in tails])
    done = stop(torch.cat([enc["input_ids"], gen], dim=1))
    assert done.tolist() == [True, False, False]  # row 3's prompt has no marker: it runs to EOS


# --------------------------------------------------------------------------------------------- dedup
def test_identical_adapters_are_evaluated_once(tiny, tmp_path, monkeypatch):
    from nlsr_lib.evaluate import engine as engine_module
    from nlsr_lib.runs import Run
    from nlsr_lib.stages.evaluate import ModelRef, generate_for

    copy = tmp_path / "copy"
    shutil.copytree(tiny["adapters"][0], copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "elsewhere"}))
    rescaled = tmp_path / "rescaled"
    shutil.copytree(tiny["adapters"][0], rescaled)
    (rescaled / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    params = dataclasses.replace(Params(), model=ModelConfig(device_map="cpu"))
    run = Run("test", root=tmp_path / "runs")
    calls = []

    class Counting:
        def generate(self, base, adapter, prompts, max_new_tokens, desc=""):
            calls.append(adapter)
            return [f"r{i}" for i in range(len(prompts))]

    monkeypatch.setattr(engine_module, "engine", lambda params: Counting())
    first = generate_for(params, run, ModelRef("a", tiny["base"], tiny["adapters"][0], None), ["p", "q"], 8, "x")
    again = generate_for(params, run, ModelRef("b", tiny["base"], str(copy), None), ["p", "q"], 8, "x")
    other = generate_for(params, run, ModelRef("c", tiny["base"], tiny["adapters"][1], None), ["p", "q"], 8, "x")
    generate_for(params, run, ModelRef("a", tiny["base"], tiny["adapters"][0], None), ["p"], 8, "x")
    generate_for(params, run, ModelRef("d", tiny["base"], str(rescaled), None), ["p", "q"], 8, "x")
    assert first == again == other == ["r0", "r1"]
    # the copy (same weights and scaling, another origin) is not generated again; other prompts or another
    # lora_alpha (same weights, another model) are
    assert calls == [tiny["adapters"][0], tiny["adapters"][1], tiny["adapters"][0], str(rescaled)]


# --------------------------------------------------------------------------------------------- vLLM
def test_vllm_backend_requests_multi_lora_greedy_generation_with_the_cut_as_stop_strings(tiny, monkeypatch):
    """vLLM is an optional extra (not installed here): a recording stand-in of its three classes checks what the
    backend asks for — one LLM per base with LoRA enabled, one stable LoRARequest id per adapter directory, greedy
    sampling that stops at the cut markers — and that the responses are extracted as the hf backend's."""
    created, requests = [], []

    class LLM:
        def __init__(self, **kwargs):
            created.append(kwargs)

        def generate(self, prompts, sampling, lora_request=None, use_tqdm=True):
            requests.append((sampling, lora_request))
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f" answer {i}!!! tail")]) for i in range(len(prompts))]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LoRARequest:
        def __init__(self, name, lora_id, path):
            self.name, self.id, self.path = name, lora_id, path

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)

    engine = VLLMEngine(ModelConfig(dtype="bfloat16"), GenerationConfig(backend="vllm"), max_lora_rank=8)
    a, b = tiny["adapters"][:2]
    for adapter in (a, b, a, None):
        responses = engine.generate(tiny["base"], adapter, ["P1 ### Response:", "P2 ### Response:"], 16)
        assert responses == ["answer 0", "answer 1"]
    assert len(created) == 1 and created[0]["enable_lora"] and created[0]["max_lora_rank"] == 8
    assert [r.id if r else None for _, r in requests] == [1, 2, 1, None]
    sampling = requests[0][0]
    assert sampling.temperature == 0.0 and sampling.max_tokens == 16
    assert set(sampling.stop) == {RESPONSE_MARKER, STOP_MARKER}


def test_vllm_ranks_and_a_missing_vllm_is_named(monkeypatch):
    assert [vllm_lora_rank(r) for r in (1, 8, 9, 128, 500)] == [8, 8, 16, 128, 512]
    with pytest.raises(ValueError, match="up to 512"):
        vllm_lora_rank(1024)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        VLLMEngine(ModelConfig(), GenerationConfig(backend="vllm"))


def test_greedy_generation_is_identical_across_runs_and_batch_sizes(tiny):
    """Issue 18: the evaluation path is deterministic on one machine: two fresh engines (two runs) at batch sizes
    1, 5 and 64 give the same responses, token for token."""
    adapter = tiny["adapters"][1]
    runs = [HFEngine(ModelConfig(device_map="cpu"), GenerationConfig(batch_size=b)).generate(
        tiny["base"], adapter, tiny["prompts"], 24) for b in (64, 5, 1, 64)]
    assert all(r == runs[0] for r in runs[1:])
    assert len(set(runs[0])) > 1  # not vacuous: the prompts get different answers
