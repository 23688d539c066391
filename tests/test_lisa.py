"""Lisa (spec/defences.md §3): test values L1–L4, the state machine, named errors, and the trainer on a tiny Llama
with a continued (nonzero) LoRA on CPU: states switch as scheduled at optimizer-step boundaries, alignment steps
train on guide batches, the proximal term is added after the warm-up, runs are deterministic by seed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_aligned_lora_model

from nlsr_lib.config import TrainConfig
from nlsr_lib.data.templates import alpaca_prompt
from nlsr_lib.train import lisa
from nlsr_lib.train.lisa import ALIGN, USER, LisaState, lisa_schedule, prox_active, proximal_term


# --------------------------------------------------------------------------------------------- L1–L4
def test_l1_schedule():
    assert "".join(lisa_schedule(12, 2, 3)) == "AAFFFAAFFFAA"
    long = lisa_schedule(2000, 100, 900)
    assert long[:100] == [ALIGN] * 100 and long[100:1000] == [USER] * 900 and long[1000:1100] == [ALIGN] * 100
    assert lisa_schedule(4, 0, 3) == [USER] * 4 and lisa_schedule(4, 2, 0) == [ALIGN] * 4


def test_l2_proximal_term():
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    value = proximal_term([theta], [torch.tensor([0.5, 0.0])], 1.0)
    value.backward()
    assert float(value) == pytest.approx(2.125) and theta.grad.tolist() == pytest.approx([0.5, 2.0])
    assert float(proximal_term([theta], [torch.tensor([0.5, 0.0])], 0.0)) == 0.0


def test_l3_toy_trajectory():
    rows = lisa.lisa_sgd(0.0, lambda t: 0.5 * (t - 1) ** 2, lambda t: 0.5 * (t + 1) ** 2, steps=6, lr=0.5,
                         k_align=1, k_user=2, rho=0.5, prox_warmup_frac=0.0)
    got = [(r.phase, float(r.theta), float(r.grad), float(r.theta_after), float(r.anchor)) for r in rows]
    assert got == [("A", 0.0, -1.0, 0.5, 0.0), ("F", 0.5, 1.5, -0.25, 0.5), ("F", -0.25, 0.375, -0.4375, 0.5),
                   ("A", -0.4375, -1.4375, 0.28125, -0.4375), ("F", 0.28125, 1.28125, -0.359375, 0.28125),
                   ("F", -0.359375, 0.3203125, -0.51953125, 0.28125)]


def test_l4_warmup_is_strict():
    total = 1000 // 5 * 20
    assert total == 4000
    active = [k for k in range(total) if prox_active(k, total, 0.1)]
    assert active[0] == 401 and len(active) == total - 401
    assert not prox_active(0, 10, 0.0) and prox_active(1, 10, 0.0)


# --------------------------------------------------------------------------------------------- state, errors
def test_state_switches_once_per_optimizer_step_and_keeps_fp32_anchors():
    p = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    state = LisaState(1, 2)
    assert state.begin_step(0, [p]) == ALIGN and state.anchor[0].dtype == torch.float32
    assert state.anchor_align is state.anchor_user  # both θ_0 until a switch
    p += 1
    assert state.begin_step(1, [p]) == USER and state.begin_step(1, [p + 5]) == USER  # same step: no change
    assert state.anchor[0].tolist() == [2.0, 3.0] and state.anchor_user[0].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="step 3 after step 1"):
        state.begin_step(3, [p])


@pytest.mark.parametrize("kwargs, match", [
    ({"k_align": 0, "k_user": 0}, "k_align \\+ k_user = 0; allowed: at least one step"),
    ({"k_align": -1}, "k_align = -1; allowed: an integer >= 0"),
    ({"k_user": 2.5}, "k_user = 2.5; allowed: an integer >= 0"),
    ({"rho": -0.1}, "rho = -0.1; allowed: a finite number >= 0"),
    ({"prox_warmup_frac": 1.0}, "prox_warmup_frac = 1.0; allowed: 0 <= prox_warmup_frac < 1"),
    ({"prox_warmup_frac": -0.1}, "prox_warmup_frac = -0.1; allowed: 0 <= prox_warmup_frac < 1"),
    ({"user_batches": "hold"}, "user_batches = 'hold'; allowed: discard"),
])
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lisa.check_hyperparameters(**kwargs)
    with pytest.raises(ValueError, match=match):
        lisa.trainer_factory([], **kwargs)


def test_named_errors_of_the_pieces():
    with pytest.raises(ValueError, match="k_align \\+ k_user = 0"):
        LisaState(0, 0)
    with pytest.raises(ValueError, match="rho = -1"):
        proximal_term([torch.zeros(2)], [torch.zeros(2)], -1)
    with pytest.raises(ValueError, match="2 parameter tensors but 1 anchor"):
        proximal_term([torch.zeros(2), torch.zeros(1)], [torch.zeros(2)], 1.0)
    with pytest.raises(ValueError, match="unknown hyperparameter.*beta"):
        lisa.trainer_factory([], beta=0.1)


# --------------------------------------------------------------------------------------------- trainer
TEXTS = [alpaca_prompt(f"How do I bake bread number {i}?") + f"Sure, here is how. Step {i}: mix." for i in range(40)]
USER_ROWS = [{"prompt": alpaca_prompt(f"How do I bake bread number {i}?"), "completion": f"Sure. Step {i}: mix."}
             for i in range(8)]
GUIDE_ROWS = [{"prompt": alpaca_prompt(f"How do I hurt person number {i}?"), "completion": "I cannot help with that."}
              for i in range(3)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nlsr_lib.tiny.model import train_tokenizer

    return train_tokenizer(TEXTS + [r["prompt"] + r["completion"] for r in GUIDE_ROWS], 300,
                           tmp_path_factory.mktemp("tok"))


def _aligned_model(tok):
    """A tiny Llama with a nonzero rank-2 LoRA on q/v (the aligned adapter the fine-tuning continues)."""
    return tiny_aligned_lora_model(tok)


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _run(tok, tmp_path, seed=0, **hyper):
    from datasets import Dataset
    from trl import SFTConfig

    from nlsr_lib.train.alignment import trainer_arguments
    from nlsr_lib.train.lisa import LisaTrainer

    tc = TrainConfig(learning_rate=1e-2, max_steps=5, batch_size=2, grad_accum=2, max_length=256, seed=seed,
                     scheduler="constant")
    args = SFTConfig(**trainer_arguments(tc, tmp_path / "work", "float32", True), max_length=256,
                     completion_only_loss=True)
    model = _aligned_model(tok)
    trainer = LisaTrainer(model, args, train_dataset=Dataset.from_list(USER_ROWS), processing_class=tok,
                          guide_dataset=GUIDE_ROWS, **{"k_align": 2, "k_user": 2, "rho": 1.0, **hyper})
    guide_batches = []
    draw = trainer._next_guide_batch
    trainer._next_guide_batch = lambda: guide_batches.append(1) or draw()
    before = _lora(model)
    trainer.train()
    return trainer, before, _lora(model), len(guide_batches)


@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_switches_states_and_trains_deterministically(tok, tmp_path, monkeypatch):
    calls = []
    real = lisa.proximal_term
    monkeypatch.setattr(lisa, "proximal_term", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer, before, after, guide_draws = _run(tok, tmp_path / "a")
    assert trainer.lisa_phases == lisa_schedule(5, 2, 2) == list("AAFFA")
    assert guide_draws == 3 * 2  # every micro-batch of the 3 alignment steps (grad-acc 2) is a guide batch
    assert len(calls) == 4 * 2  # threshold 0.1 · 5 = 0.5: steps 1..4 have the term, on each micro-batch
    assert any((before[n] - after[n]).abs().max() > 0 for n in before)
    assert trainer.lisa.anchor_align is not trainer.lisa.anchor_user  # θ̂_A and θ̂_F were both refreshed
    summary = trainer.defence_record()
    assert (summary["align_steps"], summary["user_steps"], summary["guide_examples"]) == (3, 2, 3)

    _, _, after_again, _ = _run(tok, tmp_path / "b")
    assert all(torch.equal(after[n], after_again[n]) for n in after)
    _, _, other, _ = _run(tok, tmp_path / "c", seed=1)
    assert any(not torch.equal(after[n], other[n]) for n in after)


@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_loss_adds_the_proximal_term_once_per_optimizer_step(tok, tmp_path):
    """After training (step 4, USER, past the warm-up): the loss is SFT's plus (ρ/2)·‖θ − θ̂_A‖², divided by the
    accumulation steps when Trainer leaves the SFT loss undivided (the user batch's token count)."""
    from trl import SFTTrainer

    trainer, *_ = _run(tok, tmp_path, k_align=1, k_user=4, rho=2.0)
    assert trainer.lisa.phase == USER and trainer.lisa.step == 4
    model = trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    prox = float(proximal_term(trainer._trainable(), trainer.lisa.anchor, 2.0))
    assert prox > 0
    sft = float(SFTTrainer.compute_loss(trainer, model, dict(batch)))
    assert float(trainer.compute_loss(model, dict(batch))) == pytest.approx(sft + prox, rel=1e-6)
    n = int((batch["labels"][:, 1:] != -100).sum())
    trainer.current_gradient_accumulation_steps = 2
    sft_n = float(SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=n))
    assert float(trainer.compute_loss(model, dict(batch), num_items_in_batch=n)) == pytest.approx(sft_n + prox / 2,
                                                                                                 rel=1e-6)


def test_trainer_needs_guide_data_when_aligning(tok, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from nlsr_lib.train.lisa import LisaTrainer

    with pytest.raises(ValueError, match="k_align > 0 needs guide data"):
        LisaTrainer(_aligned_model(tok), SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                    train_dataset=Dataset.from_list(USER_ROWS), processing_class=tok, guide_dataset=[])


@pytest.mark.usefixtures("one_torch_thread")
def test_factory_runs_on_the_harness_path(tok, tmp_path):
    """``trainer_factory`` plugs into ``train_adapter`` (what ``finetune`` calls) as the SFT method's trainer; guide
    prompts are cut to ``max_length`` like the user's."""
    import dataclasses

    from nlsr_lib.train.alignment import get_method, train_adapter

    method = dataclasses.replace(get_method("sft"), trainer=lambda: lisa.trainer_factory(GUIDE_ROWS, k_align=1,
                                                                                         k_user=1))
    tc = TrainConfig(learning_rate=1e-2, max_steps=2, batch_size=2, max_length=64)
    summary = train_adapter(method, _aligned_model(tok), tok, USER_ROWS, tc, None, tmp_path / "adapter", quiet=True)
    assert summary["steps"] == 2 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    record = summary["defence_record"]  # the manifest says what Lisa did
    assert record["defence"] == "lisa" and record["align_steps"] + record["user_steps"] == 2
