"""Vaccine (spec/defences.md §1): test values V1-V3, the properties (ρ = 0 is SFT, ‖ε‖ = ρ, hooks removed,
gradient accumulation), and the trl trainers on a tiny random Llama + LoRA on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_peft_llama
from torch import nn

from nlsr_lib.errors import UsageError
from nlsr_lib.train.vaccine import (
    attention_sites,
    global_norm,
    perturbation,
    site_gradients,
    vaccine_gradients,
    vaccine_loss,
    vaccine_perturbation,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------- test values
def test_v1_global_norm_over_sites():
    eps = perturbation([torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])], rho=2)
    assert torch.allclose(eps[0], torch.tensor([0.461538, 0.615385]), atol=1e-6)
    assert torch.allclose(eps[1], torch.tensor([0.0, 1.846154]), atol=1e-6)
    assert sum(e.pow(2).sum() for e in eps).item() == pytest.approx(4.0, abs=1e-5)


def test_v3_several_positions_one_site():
    (eps,) = perturbation([torch.tensor([[1.0, 2.0], [2.0, -4.0]])], rho=1)
    assert torch.allclose(eps, torch.tensor([[0.2, 0.4], [0.4, -0.8]]), atol=1e-6)


class Scale(nn.Module):
    """a = w·x: the perturbation site of the V2 model."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return self.w * x


class ScalarModel(nn.Module):
    """V2: a = w1·x (the site), ŷ = w2·(a + ε), loss ½(ŷ − y)²."""

    def __init__(self):
        super().__init__()
        self.site = Scale(1.0)
        self.w2 = nn.Parameter(torch.tensor(2.0))

    def loss(self, batch):
        x, y = batch
        return 0.5 * (self.w2 * self.site(x) - y) ** 2


def test_v2_two_pass_gradient():
    model, batch = ScalarModel(), (torch.tensor(1.0), torch.tensor(0.0))
    loss1, (g,) = site_gradients(model.loss, batch, [model.site])
    assert loss1.item() == 2.0 and g.item() == 4.0
    assert model.site.w.grad is None and model.w2.grad is None  # pass 1 writes no .grad (D-V2)
    eps, norm = vaccine_perturbation(model, model.loss, batch, rho=2, sites=[model.site])
    assert norm.item() == 4.0 and eps[0].item() == pytest.approx(2.0, abs=1e-7)
    loss2 = vaccine_gradients(model, model.loss, batch, rho=2, sites=[model.site])
    assert loss2.item() == pytest.approx(18.0, abs=1e-5)
    assert model.site.w.grad.item() == pytest.approx(12.0, abs=1e-5)
    assert model.w2.grad.item() == pytest.approx(18.0, abs=1e-5)


def test_v2_rho_zero_is_the_sft_gradient():
    model, batch = ScalarModel(), (torch.tensor(1.0), torch.tensor(0.0))
    loss = vaccine_gradients(model, model.loss, batch, rho=0, sites=[model.site])
    assert (loss.item(), model.site.w.grad.item(), model.w2.grad.item()) == (2.0, 4.0, 2.0)


# --------------------------------------------------------------------------------------------- tiny Llama
def _batch(seed: int, size: int = 2, length: int = 6):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (size, length), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100  # prompt tokens
    return {"input_ids": ids, "labels": labels}


def _lm_loss(model):
    return lambda batch: model(**batch).loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_mode_llama(dropout: float = 0.0):
    model = tiny_peft_llama(["q_proj", "v_proj"])
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = dropout
    return model.train()


def test_sites_are_every_attention_module_or_every_decoder_layer():
    model = tiny_peft_llama(["q_proj", "v_proj"])
    assert [type(m).__name__ for m in attention_sites(model)] == ["LlamaAttention"] * 2
    assert [type(m).__name__ for m in attention_sites(model, "block_output")] == ["LlamaDecoderLayer"] * 2
    with pytest.raises(UsageError, match=r"vaccine site: 'mlp' is not allowed; choose one of attention, "
                                         r"block_output"):
        attention_sites(model, "mlp")
    with pytest.raises(UsageError, match="no module whose class name ends in 'DecoderLayer'"):
        attention_sites(nn.Linear(2, 2))


@pytest.mark.parametrize("rho", [-1.0, float("nan"), "2"])
def test_rho_must_be_a_number_at_least_zero(rho):
    with pytest.raises(UsageError, match=r"vaccine rho: .* must be a number ≥ 0"):
        perturbation([torch.ones(2)], rho)


def test_rho_zero_gives_exactly_the_sft_gradient_with_dropout():
    """Same RNG state for both passes (D-V3): the ρ = 0 step draws the dropout masks of a plain SFT step."""
    model, batch = _train_mode_llama(dropout=0.5), _batch(0)
    torch.manual_seed(7)
    model(**batch).loss.backward()
    sft = _grads(model)
    model.zero_grad()
    torch.manual_seed(7)
    vaccine_gradients(model, _lm_loss(model), batch, rho=0)
    assert all(torch.equal(sft[n], g) for n, g in _grads(model).items())


@pytest.mark.parametrize("site", ["attention", "block_output"])
def test_perturbation_has_size_rho_and_changes_the_gradient(site):
    model, batch = _train_mode_llama(), _batch(1)
    eps, norm = vaccine_perturbation(model, _lm_loss(model), batch, rho=0.7, site=site)
    assert norm.item() > 0 and global_norm(eps).item() == pytest.approx(0.7, rel=1e-5)
    assert [e.shape for e in eps] == [torch.Size([2, 6, 32])] * 2
    vaccine_gradients(model, _lm_loss(model), batch, rho=0.7, site=site)
    perturbed = _grads(model)
    model.zero_grad()
    vaccine_gradients(model, _lm_loss(model), batch, rho=0.0, site=site)
    assert any(not torch.equal(perturbed[n], g) for n, g in _grads(model).items())


def test_hooks_are_removed_afterwards_also_on_error():
    model, batch = _train_mode_llama(), _batch(2)
    sites = attention_sites(model)
    vaccine_gradients(model, _lm_loss(model), batch, rho=2)
    loss = vaccine_loss(model, _lm_loss(model), batch, rho=2)
    assert loss.requires_grad and all(not s._forward_hooks for s in sites)
    calls = []

    def failing(b):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return model(**b).loss

    with pytest.raises(RuntimeError, match="boom"):
        vaccine_gradients(model, failing, batch, rho=2)
    assert all(not s._forward_hooks for s in sites)


def test_gradient_accumulation_sums_the_micro_batch_gradients():
    """Pass 1 writes no .grad (D-V2): two accumulated micro-steps = the sum of the two separate gradients."""
    model, first, second = _train_mode_llama(), _batch(3), _batch(4)
    vaccine_gradients(model, _lm_loss(model), first, rho=2)
    g1 = _grads(model)
    model.zero_grad()
    vaccine_gradients(model, _lm_loss(model), second, rho=2)
    g2 = _grads(model)
    model.zero_grad()
    vaccine_gradients(model, _lm_loss(model), first, rho=2)
    vaccine_gradients(model, _lm_loss(model), second, rho=2)
    assert all(torch.allclose(g, g1[n] + g2[n], rtol=0, atol=1e-7) for n, g in _grads(model).items())


# --------------------------------------------------------------------------------------------- trl trainers
TEXTS = [f"### Instruction:\nHow do I bake bread number {i}?\n\n### Response:\nSure, step {i}: mix." for i in range(40)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nlsr_lib.tiny.model import train_tokenizer

    return train_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok"))


def _tiny_lora_model(tok, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from nlsr_lib.config import TinyModelConfig
    from nlsr_lib.tiny.model import tiny_llama_config

    torch.manual_seed(0)
    cfg = TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(tiny_llama_config(cfg, tok))
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(model, lora)


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _args(config_cls, tmp_path, checkpointing: bool = False, **extra):
    from nlsr_lib.config import TrainConfig
    from nlsr_lib.train.alignment import trainer_arguments

    tc = TrainConfig(learning_rate=1e-2, max_steps=3, batch_size=2, scheduler="constant", warmup_ratio=0.0,
                     max_length=48, seed=3, gradient_checkpointing=checkpointing)
    return config_cls(**trainer_arguments(tc, tmp_path, "float32", quiet=True, world_size=1), **extra)


SFT_ROWS = [{"prompt": f"### Instruction:\nHow do I bake bread number {i}?\n\n### Response:\n",
             "completion": f"Sure, step {i}: mix."} for i in range(8)]


def _train_sft(trainer_cls, tok, tmp_path, dropout=0.1, checkpointing=False, **kw):
    from datasets import Dataset
    from trl import SFTConfig

    model = _tiny_lora_model(tok, dropout)
    before = _lora_state(model)
    args = _args(SFTConfig, tmp_path, checkpointing, max_length=48, completion_only_loss=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(SFT_ROWS), processing_class=tok,
                          **kw)
    trainer.train()
    return before, _lora_state(model), trainer


def test_vaccine_sft_trainer_changes_the_adapter_deterministically(tok, tmp_path):
    from trl import SFTTrainer

    from nlsr_lib.train.vaccine import VaccineSFTTrainer

    before, after, trainer = _train_sft(VaccineSFTTrainer, tok, tmp_path / "a", rho=2.0)
    assert trainer.state.global_step == 3
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(not s._forward_hooks for s in trainer.vaccine_sites())
    record = trainer.defence_record()  # what the run did, for the manifest
    assert record["rho"] == 2.0 and record["sites"] == len(trainer.vaccine_sites()) > 0
    assert record["perturbed_micro_batches"] == 3 and record["mean_site_grad_norm"] > 0
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.log_history and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    _, again, _ = _train_sft(VaccineSFTTrainer, tok, tmp_path / "b", rho=2.0)
    assert all(torch.equal(after[n], again[n]) for n in after)
    # ρ = 0 with LoRA dropout 0.1: the same steps as plain SFT (same dropout masks in both passes, D-V3)
    _, zero, _ = _train_sft(VaccineSFTTrainer, tok, tmp_path / "c", rho=0.0)
    _, sft, plain = _train_sft(SFTTrainer, tok, tmp_path / "d")
    assert all(torch.equal(zero[n], sft[n]) for n in sft)
    assert any(not torch.equal(after[n], sft[n]) for n in sft)
    # pass 1 leaves the trainer's metrics alone: each batch's tokens are counted once
    assert trainer.state.log_history[-1]["num_tokens"] == plain.state.log_history[-1]["num_tokens"]
    # non-reentrant gradient checkpointing recomputes the forward with the hooks on: the same steps
    _, checkpointed, _ = _train_sft(VaccineSFTTrainer, tok, tmp_path / "e", checkpointing=True, rho=2.0)
    assert all(torch.equal(after[n], checkpointed[n]) for n in after)


def test_vaccine_trainer_refuses_bad_hyperparameters(tok, tmp_path):
    from nlsr_lib.train.vaccine import VaccineSFTTrainer

    with pytest.raises(UsageError, match="vaccine rho: -1"):
        _train_sft(VaccineSFTTrainer, tok, tmp_path, rho=-1)
    with pytest.raises(UsageError, match="vaccine site: 'embedding'"):
        _train_sft(VaccineSFTTrainer, tok, tmp_path, site="embedding")


def _train_dpo(trainer_cls, tok, tmp_path, **kw):
    from datasets import Dataset
    from trl import DPOConfig

    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": f"No {i}."} for i, r in enumerate(SFT_ROWS)]
    model = _tiny_lora_model(tok, 0.0)
    args = _args(DPOConfig, tmp_path, max_length=48, beta=0.1, loss_type=["sigmoid"])
    return model, trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                              **kw)


def test_vaccine_dpo_trainer_keeps_hooks_off_the_reference(tok, tmp_path):
    """D-V4: the reference log-probs are computed before the hooks are installed; ε comes from the policy loss."""
    from trl import DPOTrainer

    from nlsr_lib.train.vaccine import VaccineDPOTrainer

    model, trainer = _train_dpo(VaccineDPOTrainer, tok, tmp_path / "a", rho=2.0)
    before = _lora_state(model)
    hooked_during_reference = []
    reference = trainer.compute_ref_log_probs

    def spy(*a, **k):
        hooked_during_reference.append(any(s._forward_hooks for s in trainer.vaccine_sites()))
        return reference(*a, **k)

    trainer.compute_ref_log_probs = spy
    trainer.train()
    assert hooked_during_reference == [False] * 3 and trainer.precompute_ref_logps is False
    after = _lora_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert any(h.get("vaccine/grad_norm", 0) > 0 for h in trainer.state.log_history)
    # ρ = 0: the reference read from the batch gives exactly trl's own DPO steps
    zero, trainer = _train_dpo(VaccineDPOTrainer, tok, tmp_path / "b", rho=0.0)
    trainer.train()
    dpo, trainer = _train_dpo(DPOTrainer, tok, tmp_path / "c")
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(_lora_state(zero).values(), _lora_state(dpo).values()))
