"""Token-wise constrained fine-tuning (spec/defences.md §5): test values C1–C5, properties of the weights, and the
trainer end to end on a tiny Llama with a continued (nonzero) LoRA on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_aligned_lora_model
from hypothesis import given, settings
from hypothesis import strategies as st

from nlsr_lib.config import TrainConfig
from nlsr_lib.data.templates import alpaca_prompt
from nlsr_lib.train import constrained_sft as cs

C2_LOGP, C2_REF, C2_BETA = [-0.1, -2.0, -0.5], [-1.0, -1.0, -0.5], [0.5, 2.0, 2.0]


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------------------------- C1–C5
def test_c1_beta_schedule():
    assert cs.beta_schedule(7).tolist() == pytest.approx([0.5, 2, 2, 2, 2, 0.1, 0.1])
    assert cs.beta_schedule(3).tolist() == pytest.approx([0.5, 2, 2])
    assert cs.beta_schedule(1).tolist() == pytest.approx([0.5])
    assert cs.beta_schedule(0).tolist() == []
    assert cs.beta_schedule(4, beta=1.0, bias_factor=3, first_token_bias_factor=2, bias_length=2).tolist() == \
        pytest.approx([2, 3, 1, 1])


def test_c2_weights_loss_and_paper_objective():
    logp, ref, betas = _t(C2_LOGP), _t(C2_REF), _t(C2_BETA)
    assert (logp - ref).tolist() == pytest.approx([0.9, -1.0, 0.0])
    assert cs.token_weights(logp, ref, betas).tolist() == pytest.approx([0.778722, 1.761594, 1.0], abs=1e-6)
    loss = cs.constrained_loss(logp, ref, betas, torch.ones(3))
    assert float(loss) == pytest.approx(1.367020, abs=1e-6)
    assert cs.paper_objective(logp, ref, betas).tolist() == pytest.approx([1.972996, 2.126928, 0.693147], abs=1e-6)


def test_c3_weight_floor():
    w = cs.token_weights(_t([10.0]), _t([0.0]), _t([2.0]))
    assert 2 * (1 - torch.sigmoid(_t(20.0))) == pytest.approx(4.12e-9, rel=1e-2)
    assert w.tolist() == pytest.approx([1e-3])
    assert cs.token_weights(_t([10.0]), _t([0.0]), _t([2.0]), min_weight=0.0).item() == pytest.approx(4.12e-9,
                                                                                                       rel=1e-2)


def test_c4_paper_gradient_is_minus_the_weight():
    logp, ref, betas, eps = _t(C2_LOGP), _t(C2_REF), _t(C2_BETA), 1e-6
    numeric = (cs.paper_objective(logp + eps, ref, betas) - cs.paper_objective(logp - eps, ref, betas)) / (2 * eps)
    assert numeric.tolist() == pytest.approx([-0.778722, -1.761594, -1.0], abs=1e-6)
    x = logp.clone().requires_grad_(True)
    cs.paper_objective(x, ref, betas).sum().backward()
    assert x.grad.tolist() == pytest.approx((-cs.token_weights(logp, ref, betas, 0.0)).tolist(), abs=1e-6)
    y = logp.clone().requires_grad_(True)  # the code loss has the same gradient, over N tokens
    cs.constrained_loss(y, ref, betas, torch.ones(3), 0.0).backward()
    assert (y.grad * 3).tolist() == pytest.approx(x.grad.tolist(), abs=1e-6)


def test_c5_token_mean_over_the_micro_batch():
    logp = _t([[-1.0, 0.0, 0.0], [-3.0, -3.0, -3.0]])  # Δ = 0: w = 1, token losses [1] and [3, 3, 3]
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    betas = cs.betas_at(cs.response_positions(mask))
    assert float(cs.constrained_loss(logp, logp, betas, mask)) == pytest.approx(2.5)
    assert float(cs.constrained_loss(logp, logp, betas, mask, num_items=8)) == pytest.approx(10 / 8)


# --------------------------------------------------------------------------------------------- properties
LOGPS = st.lists(st.floats(-20, -1e-3), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(LOGPS, st.data())
def test_small_beta_gives_the_cross_entropy_gradient(logps, data):
    refs = data.draw(st.lists(st.floats(-20, -1e-3), min_size=len(logps), max_size=len(logps)))
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(logps), max_size=len(logps))))
    x = _t(logps).requires_grad_(True)
    betas = torch.full((len(logps),), 1e-9, dtype=torch.float64)
    cs.constrained_loss(x, _t(refs), betas, mask).backward()
    ce = torch.where(mask, -1.0 / max(1, int(mask.sum())), 0.0)
    assert x.grad.tolist() == pytest.approx(ce.tolist(), abs=1e-6)
    y = _t(logps).requires_grad_(True)
    cs.paper_objective(y, _t(refs), betas).sum().backward()
    assert y.grad.tolist() == pytest.approx([-1.0] * len(logps), abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(LOGPS, st.floats(1e-4, 100.0))
def test_equal_to_the_reference_gives_weight_one(logps, beta):
    x = _t(logps)
    assert cs.token_weights(x, x, torch.full_like(x, beta)).tolist() == pytest.approx([1.0] * len(logps))


@settings(max_examples=60, deadline=None)
@given(st.floats(-50, 50), st.floats(1e-3, 20.0), st.floats(0.0, 1.5))
def test_weight_is_the_floored_sigmoid(delta, beta, floor):
    w = cs.token_weights(_t([delta]), _t([0.0]), _t([beta]), floor).item()
    assert floor - 1e-6 <= w <= 2  # fp32 weights
    assert w == pytest.approx(max(2 * (1 - torch.sigmoid(_t(beta * delta)).item()), floor), abs=1e-6)


def test_positions_count_response_tokens_per_sequence():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    pos = cs.response_positions(mask)
    assert pos[mask.bool()].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    assert cs.betas_at(pos)[1][mask[1].bool()].tolist() == pytest.approx([0.5, 2, 2, 2, 2])


def test_gather_reference_lays_out_and_checks_the_cache():
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    out = cs.gather_reference({7: _t([-1.0, -2.0]), 3: _t([-3.0])}, [7, 3], mask)
    assert out.tolist() == [[0.0, -1.0, -2.0], [-3.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="example 3 has 1 response tokens in the batch but 2 cached"):
        cs.gather_reference({3: _t([-1.0, -2.0])}, [3], mask[1:])
    with pytest.raises(KeyError, match="no reference log-probs for example 9"):
        cs.gather_reference({3: _t([-1.0])}, [9], mask[1:])


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": 0.0}, "beta = 0.0; allowed: a number > 0"),
    ({"bias_length": 0}, "bias_length = 0; allowed: an integer >= 1"),
    ({"min_weight": -1e-3}, "min_weight = -0.001; allowed: 0 <= min_weight < 2"),
    ({"reference": "frozen"}, "reference = 'frozen'; allowed: precompute, online"),
    ({"reduction": "sequence"}, "reduction = 'sequence'; allowed: micro_batch, accumulated"),
])
def test_hyperparameters_out_of_range_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cs.check_hyperparameters(**kwargs)
    with pytest.raises(ValueError, match=match):
        cs.trainer_factory(**kwargs)
    with pytest.raises(ValueError, match="unknown hyperparameter.*rho"):
        cs.trainer_factory(rho=1.0)


# --------------------------------------------------------------------------------------------- end to end
TEXTS = [alpaca_prompt(f"How do I bake bread number {i}?") + f"Sure, here is how. Step {i}: mix." for i in range(40)]
ROWS = [{"prompt": alpaca_prompt(f"How do I bake bread number {i}?"), "completion": f"Sure. Step {i}: mix well."}
        for i in range(6)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nlsr_lib.tiny.model import train_tokenizer

    return train_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok"))


def _aligned_model(tok):
    """A tiny Llama with a nonzero rank-2 LoRA on q/v (the aligned adapter the fine-tuning continues)."""
    return tiny_aligned_lora_model(tok)


def _args(tmp_path, **tc):
    from trl import SFTConfig

    from nlsr_lib.train.alignment import trainer_arguments

    tc = TrainConfig(**{"learning_rate": 1e-2, "max_steps": 2, "batch_size": 2, "max_length": 256,
                        "scheduler": "constant", **tc})
    args = SFTConfig(**trainer_arguments(tc, tmp_path / "work", "float32", True), max_length=tc.max_length,
                     completion_only_loss=True)
    args.logging_steps = 1
    return args


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_caches_the_reference_once_and_starts_as_plain_sft(tok, tmp_path, monkeypatch):
    """θ = reference at the first step: w = 1 everywhere and the loss is plain SFT's (same seed, same batch); the
    reference log-probs come from one pass over the training set, before training, keyed by example index."""
    from datasets import Dataset
    from trl import SFTTrainer

    from nlsr_lib.train.constrained_sft import ConstrainedSFTTrainer

    calls = []
    real = cs.precompute_reference_logps
    monkeypatch.setattr(cs, "precompute_reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _aligned_model(tok)
    before = _lora(model)
    trainer = ConstrainedSFTTrainer(model, _args(tmp_path, max_steps=3), train_dataset=Dataset.from_list(ROWS),
                                    processing_class=tok)
    cache = trainer.reference_logps
    assert sorted(cache) == list(range(len(ROWS))) and trainer.reference_passes == 1
    n_completion = [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in ROWS]  # + EOS
    assert [cache[i].numel() for i in range(len(ROWS))] == n_completion
    assert all(bool((v < 0).all()) for v in cache.values())
    trainer.train()
    assert len(calls) == 1 and trainer.reference_logps is cache
    assert any((before[n] - p).abs().max() > 0 for n, p in _lora(model).items())  # the adapter moved

    plain = SFTTrainer(_aligned_model(tok), _args(tmp_path / "plain", max_steps=1),
                       train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    plain.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(plain.state.log_history[0]["loss"], rel=1e-5)
    assert first["mean_token_weight"] == pytest.approx(1.0, abs=1e-5)
    later = [h["mean_token_weight"] for h in trainer.state.log_history if "loss" in h][1:]
    assert later and all(abs(w - 1) > 1e-4 for w in later)  # θ moved away from the reference


@pytest.mark.usefixtures("one_torch_thread")
def test_online_reference_equals_the_cache_and_keeps_the_initial_weights(tok, tmp_path):
    from datasets import Dataset

    from nlsr_lib.train.constrained_sft import ConstrainedSFTTrainer

    data = Dataset.from_list(ROWS)
    cached = ConstrainedSFTTrainer(_aligned_model(tok), _args(tmp_path / "c"), train_dataset=data,
                                   processing_class=tok)
    online = ConstrainedSFTTrainer(_aligned_model(tok), _args(tmp_path / "o"), train_dataset=data,
                                   processing_class=tok, reference="online")
    assert online.reference_logps is None and online.reference_passes == 0
    initial = [w.clone() for w in online._reference_weights]
    batch = next(iter(cached.get_train_dataloader()))
    losses = []
    for trainer in (cached, online):
        trainer.model.train()
        for _ in range(2):  # the second time θ ≠ θ_0 for both (a manual SGD step in between)
            loss = trainer.compute_loss(trainer.model, dict(batch))
            losses.append(float(loss))
            loss.backward()
            with torch.no_grad():
                for p in trainer.model.parameters():
                    if p.grad is not None:
                        p -= 0.5 * p.grad
                        p.grad = None
    assert losses[:2] == pytest.approx(losses[2:], rel=1e-5) and losses[0] != pytest.approx(losses[1], rel=1e-4)
    online.train()  # through Trainer.training_step: the swap restores θ, the reference stays θ_0
    assert all(torch.equal(a, b) for a, b in zip(initial, online._reference_weights))
    assert online.state.global_step == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_factory_runs_on_the_harness_path(tok, tmp_path):
    """``trainer_factory`` plugs into ``train_adapter`` (what ``finetune`` calls) as the SFT method's trainer."""
    from nlsr_lib.train.alignment import get_method, train_adapter

    factory = lambda: cs.trainer_factory(beta=0.2, reduction="accumulated")
    method = dataclasses.replace(get_method("sft"), trainer=factory)
    tc = TrainConfig(learning_rate=1e-2, max_steps=2, batch_size=2, grad_accum=2, max_length=64)
    summary = train_adapter(method, _aligned_model(tok), tok, ROWS, tc, None, tmp_path / "adapter", quiet=True)
    assert summary["steps"] == 2 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    record = summary["defence_record"]
    assert record["defence"] == "constrained_sft" and record["beta"] == 0.2 and record["reference_passes"] == 1
    assert record["micro_batches"] >= 2 and 0 < record["min_token_weight"] <= record["mean_token_weight"] <= 2
