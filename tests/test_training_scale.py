"""Training as the paper at 8B (issue 15, item 3): the effective batch as a parameter (grad_accum from the number of
processes), KTO's per-device batch > 1, adapters saved in the model's dtype, and the learned mask in micro-batches
with chunked log-probs and checkpointed layers — the same gradient with a bounded memory. Tiny random models."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_fusion, tiny_peft_llama
from nlsr_lib.config import LoraConfig, ParamsError, TinyModelConfig, TrainConfig, load_params
from nlsr_lib.data.templates import alpaca_prompt
from nlsr_lib.fusion.learned_mask import (
    ConcreteMask, Fusion, MaskObjective, checkpointing, label_logps, lora_parameter_names, micro_batches, train_mask,
)

PARAMS = Path(__file__).resolve().parents[1] / "params"
PAPER = PARAMS / "paper_llama3_8b.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------- effective batch
def test_paper_profiles_train_at_the_papers_effective_batch_with_two_per_device():
    for name in ("paper_llama3_8b", "mistral_7b", "qwen2_7b"):
        p = load_params(PARAMS / f"{name}.yaml")
        trainings = {m: getattr(p.alignment, m) for m in p.alignment.methods} | {"attack": p.attack.train}
        assert {m: tc.effective_batch for m, tc in trainings.items()} == {
            "sft": 16, "dpo": 8, "orpo": 8, "kto": 8, "simpo": 8, "attack": 8}
        assert all(tc.batch_size == 2 and tc.gradient_checkpointing for tc in trainings.values())
        assert p.alignment.sft.accumulation(1) == 8 and p.alignment.dpo.accumulation(4) == 1
        lm = p.fusion.learned_mask
        assert lm.micro_batch > 0 and lm.logprob_chunk > 0 and lm.gradient_checkpointing


def test_tiny_profiles_keep_their_batches():
    """tiny and smoke set no effective batch: batch_size × grad_accum as before (weights unchanged)."""
    for name in ("tiny", "smoke"):
        p = load_params(PARAMS / f"{name}.yaml")
        for tc in [getattr(p.alignment, m) for m in p.alignment.methods] + [p.attack.train]:
            assert tc.effective_batch == 0 and tc.accumulation(1) == tc.grad_accum == 1
    assert load_params(PARAMS / "tiny.yaml").fusion.learned_mask.micro_batch == 0


def test_kto_per_device_batch_of_one_is_refused_naming_the_key():
    with pytest.raises(ParamsError, match=r"alignment\.kto\.batch_size: 1 is too small.*Actual \(not effective\) "
                                          r"batch size must be > 1"):
        load_params(PAPER, {"alignment.kto.batch_size": 1})
    load_params(PAPER, {"alignment.kto.batch_size": 1, "alignment.methods": ["sft", "dpo"],  # KTO not trained
                        "expo.methods": ["sft", "dpo"]})


@pytest.mark.parametrize("world, sft, dpo", [(1, 8, 4), (2, 4, 2), (4, 2, 1)])
def test_effective_batch_gives_grad_accum_per_world_size(world, sft, dpo, tmp_path):
    from nlsr_lib.train.alignment import trainer_arguments

    p = load_params(PAPER)
    assert (p.alignment.sft.accumulation(world), p.alignment.dpo.accumulation(world)) == (sft, dpo)
    assert p.alignment.sft.effective(world) == 16 and p.attack.train.effective(world) == 8
    args = trainer_arguments(p.alignment.sft, tmp_path, "bfloat16", True, world_size=world)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (2, sft)
    assert args["bf16"] and args["gradient_checkpointing"]
    assert args["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    tiny = trainer_arguments(TrainConfig(batch_size=8, grad_accum=3), tmp_path, "float32", True, world_size=world)
    assert tiny["gradient_accumulation_steps"] == 3 and "gradient_checkpointing_kwargs" not in tiny


def test_effective_batch_not_divisible_is_a_named_error(monkeypatch):
    with pytest.raises(ParamsError, match=r"attack\.train\.effective_batch: 8 is not divisible by attack\.train\."
                                          r"batch_size × processes = 2 × 8 = 16"):
        TrainConfig(batch_size=2, effective_batch=8).accumulation(8, "attack.train")
    with pytest.raises(ParamsError, match=r"alignment\.sft\.effective_batch: 16 is not divisible .* 3 × 1 = 3"):
        load_params(PAPER, {"alignment.sft.batch_size": 3})
    monkeypatch.setenv("WORLD_SIZE", "8")  # under `accelerate launch` on 8 GPUs: caught when params load
    with pytest.raises(ParamsError, match=r"alignment\.dpo\.effective_batch: 8 .* 2 × 8 = 16"):
        load_params(PAPER)
    monkeypatch.setenv("WORLD_SIZE", "4")
    load_params(PAPER)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8))
def test_effective_batch_is_kept_whenever_it_divides(batch, world, accum):
    tc = TrainConfig(batch_size=batch, effective_batch=batch * world * accum)
    assert tc.accumulation(world) == accum and tc.effective(world) == batch * world * accum
    assert TrainConfig(batch_size=batch, grad_accum=accum).effective(world) == batch * accum * world


# --------------------------------------------------------------------------------------------- adapter dtype
TEXTS = [alpaca_prompt(f"How do I bake bread number {i}?") + f"Sure, here is how. Step {i}: mix." for i in range(40)]
ROWS = [{"prompt": alpaca_prompt(f"How do I bake bread number {i}?"), "completion": f"Sure. Step {i}: mix."}
        for i in range(8)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nlsr_lib.tiny.model import train_tokenizer

    return train_tokenizer(TEXTS, 400, tmp_path_factory.mktemp("tok"))


def _tiny_lm(tok, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    from nlsr_lib.tiny.model import tiny_llama_config

    torch.manual_seed(0)
    cfg = TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(tiny_llama_config(cfg, tok)).to(dtype)


def _dtypes(adapter: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def _lora():
    from nlsr_lib.models import peft_lora_config

    return peft_lora_config(LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")))


def test_adapter_trained_on_a_bf16_model_is_saved_in_bf16(tok, tmp_path):
    """LoRA trains in fp32 over the bf16 base (PEFT's autocast, as LLaMA-Factory) and is saved in bf16; the attack
    continues it (upcast again) and saves bf16; ``adapter_dtype: float32`` keeps fp32. Checkpointed layers."""
    from nlsr_lib.train.alignment import get_method, train_adapter
    from nlsr_lib.train.finetune import finetune

    tc = TrainConfig(learning_rate=1e-3, max_steps=1, batch_size=2, effective_batch=4, max_length=64,
                     gradient_checkpointing=True)
    model = _tiny_lm(tok, torch.bfloat16)
    summary = train_adapter(get_method("sft"), model, tok, ROWS, tc, _lora(), tmp_path / "sft", "bfloat16",
                            quiet=True)
    assert _dtypes(tmp_path / "sft") == {"BF16"}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # trained in fp32
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert (summary["per_device_batch"], summary["grad_accum"], summary["effective_batch"]) == (2, 2, 4)
    assert summary["processes"] == 1 and summary["adapter_dtype"] == "bfloat16" and summary["steps"] == 1
    records = [{"instruction": r["prompt"], "output": r["completion"]} for r in ROWS]
    finetune(_tiny_lm(tok, torch.bfloat16), tok, tmp_path / "sft", records, tc, None, tmp_path / "ft", "bfloat16",
             quiet=True)
    assert _dtypes(tmp_path / "ft") == {"BF16"}
    fp32 = dataclasses.replace(tc, adapter_dtype="float32")
    train_adapter(get_method("sft"), _tiny_lm(tok, torch.bfloat16), tok, ROWS, fp32, _lora(), tmp_path / "f32",
                  "bfloat16", quiet=True)
    assert _dtypes(tmp_path / "f32") == {"F32"}


def test_effective_batch_trains_exactly_as_the_same_grad_accum(tok, tmp_path):
    """fp32 (tiny): ``effective_batch`` 8 at batch 4 is ``grad_accum`` 2, bit for bit; the adapter stays fp32."""
    from nlsr_lib.train.alignment import get_method, train_adapter

    files = []
    for name, tc in (("accum", TrainConfig(learning_rate=1e-3, max_steps=2, batch_size=4, grad_accum=2,
                                           max_length=64)),
                     ("effective", TrainConfig(learning_rate=1e-3, max_steps=2, batch_size=4, grad_accum=5,
                                               effective_batch=8, max_length=64))):
        train_adapter(get_method("sft"), _tiny_lm(tok), tok, ROWS * 2, tc, _lora(), tmp_path / name, quiet=True)
        files.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1] and _dtypes(tmp_path / "accum") == {"F32"}


# --------------------------------------------------------------------------------------------- learned mask
@pytest.fixture(scope="module")
def peft_model():
    return tiny_peft_llama(["q_proj", "v_proj", "down_proj"])


def _pref_batch(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    """Right-padded preference pairs of different lengths, prompt tokens masked with −100."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for side, t in (("chosen", 11), ("rejected", 14)):
        ids = torch.randint(1, 64, (n, t), generator=gen)
        lengths = torch.randint(6, t + 1, (n,), generator=gen)
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[:, :4] = -100
        out |= {f"{side}_input_ids": ids * mask, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return out


@settings(max_examples=25, deadline=None)
@given(chunk=st.integers(1, 40), length=st.integers(5, 24), seed=st.integers(0, 1000))
def test_chunked_logps_equal_full_logps(peft_model, chunk, length, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0  # a right-padded row
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, : length // 3] = -100
    with torch.no_grad():
        full = label_logps(peft_model, ids, mask, labels, 0)
        chunked = label_logps(peft_model, ids, mask, labels, chunk)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_chunked_logps_refuse_a_lora_output_layer():
    from nlsr_lib.fusion.learned_mask import check_chunked_logits

    model = tiny_peft_llama(["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"logprob_chunk needs the output layer to be a plain Linear.*"
                                         r"logprob_chunk: 0"):
        check_chunked_logits(model, torch.zeros(1, 8, dtype=torch.long))


def _logit_grads(model, fusion: Fusion, batch, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``∂ℓ/∂L`` of one step at one relaxed sample (seed 0), and the margins."""
    names = lora_parameter_names(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    mask = ConcreteMask({k: v.shape for k, v in fusion.aligned.items()})
    mask.logits[0].data.normal_(generator=torch.Generator().manual_seed(3))  # not at the symmetric init
    reference = {names[k]: v for k, v in fusion.state(None).items()}
    objective = MaskObjective(model, names, reference, torch.float32, beta=0.1,
                              micro_batch=kwargs.get("micro_batch", 0), logprob_chunk=kwargs.get("logprob_chunk", 0),
                              checkpointed=kwargs.get("checkpointed", False))
    with checkpointing(model, objective.checkpointed):
        margin = objective.backward(fusion.state(mask.relaxed(torch.Generator().manual_seed(0))), batch)
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    return [lg.grad.clone() for lg in mask.logits], margin


@pytest.mark.parametrize("settings_", [{"micro_batch": 1}, {"micro_batch": 3}, {"micro_batch": 2, "logprob_chunk": 5},
                                       {"logprob_chunk": 3}, {"checkpointed": True},
                                       {"micro_batch": 2, "logprob_chunk": 4, "checkpointed": True}])
def test_micro_batched_gradient_equals_the_one_batch_gradient(settings_, peft_model):
    fusion = random_fusion(peft_model, 2)
    batch = _pref_batch(7, n=5)
    want, want_margin = _logit_grads(peft_model, fusion, batch)
    got, margin = _logit_grads(peft_model, fusion, batch, **settings_)
    assert all(float(g.abs().max()) > 0 for g in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(margin, want_margin, rtol=1e-5, atol=1e-5)
    assert all(not getattr(m, "gradient_checkpointing", False) for m in peft_model.modules())  # restored
    assert not any(m.training for m in peft_model.modules())


def test_micro_batches_cut_each_slice_to_its_longest_row():
    batch = _pref_batch(1, n=5)
    parts = micro_batches(batch, 2)
    assert [p["chosen_input_ids"].shape[0] for p in parts] == [2, 2, 1]
    for p in parts:
        for side in ("chosen", "rejected"):
            assert p[f"{side}_input_ids"].shape[1] == int(p[f"{side}_attention_mask"].sum(1).max())
    assert micro_batches(batch, 0)[0] is not batch and set(micro_batches(batch, 5)[0]) == set(batch)
    assert all(torch.equal(micro_batches(batch, 8)[0][k], v) for k, v in batch.items())


def _train_mask_before(model, fusion: Fusion, batches, *, beta=0.1, learning_rate=5e-3, epochs=3.0, seed=42):
    """The learned mask's training loop as it was before micro-batching (commit 64e0b6b), for the identity test."""
    from nlsr_lib.regions.snip import sequence_logps

    def pair_logps(overrides, batch):
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

        def both(name, fill):
            return torch.cat([F.pad(batch[f"{s}_{name}"], (0, width - batch[f"{s}_{name}"].shape[1]), value=fill)
                              for s in ("chosen", "rejected")])

        def substituted(**kw):
            return torch.func.functional_call(model, dict(overrides), args=(), kwargs=kw, strict=False)

        return sequence_logps(substituted, both("input_ids", 0), both("attention_mask", 0), both("labels", -100))

    names = lora_parameter_names(model)
    mask = ConcreteMask({k: v.shape for k, v in fusion.aligned.items()})
    steps = max(1, math.ceil(len(batches) * epochs))
    optimizer = torch.optim.AdamW(mask.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator, order = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    reference = {names[k]: v.detach() for k, v in fusion.state(None).items()}
    schedule_iter = (batches[i] for _ in range(math.ceil(epochs) + 1)
                     for i in torch.randperm(len(batches), generator=order).tolist())
    losses = []
    for _ in range(steps):
        batch = next(schedule_iter)
        n = batch["chosen_input_ids"].shape[0]
        with torch.no_grad():
            ref = pair_logps(reference, batch)
        policy = pair_logps({names[k]: v for k, v in fusion.state(mask.relaxed(generator)).items()}, batch)
        margin = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])
        loss = -F.logsigmoid(beta * margin).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    return mask, losses


def test_default_learned_mask_is_bit_identical_to_the_one_pass_loop(peft_model):
    fusion = random_fusion(peft_model, 2)
    batches = [_pref_batch(1), _pref_batch(2)]
    before, losses = _train_mask_before(peft_model, fusion, batches, learning_rate=0.05, epochs=1.5)
    mask, history = train_mask(peft_model, fusion, batches, learning_rate=0.05, epochs=1.5, show_progress=False)
    assert [h["loss"] for h in history] == losses
    assert all(torch.equal(a, b) for a, b in zip(mask.logits, before.logits))


def test_learned_mask_at_scale_settings_trains_as_the_default(peft_model):
    """Micro-batches of one pair, chunked log-probs and checkpointed layers: the same losses and logits."""
    fusion = random_fusion(peft_model, 1)
    batches = [_pref_batch(1), _pref_batch(2)]
    _, want = train_mask(peft_model, fusion, batches, learning_rate=0.05, epochs=1.0, show_progress=False)
    _, got = train_mask(peft_model, fusion, batches, learning_rate=0.05, epochs=1.0, micro_batch=1,
                        logprob_chunk=4, gradient_checkpointing=True, show_progress=False)
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-5, abs=1e-6)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())  # flags restored
