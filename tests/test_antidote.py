"""Antidote (spec/defences.md §4): test values A1–A3, grouping, ties, exact counts, end to end on a tiny PEFT Llama."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import tiny_peft_llama
from nlsr_lib.models import read_adapter
from nlsr_lib.regions.lora import lora_weights
from nlsr_lib.regions.masks import load_mask
from nlsr_lib.restore.antidote import (
    MASK_FILE, antidote, antidote_scores, harmful_input_statistics, harmful_mask, kept_count, prune_adapter,
    save_antidote,
)

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
A_KEY, B_KEY = "base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"


class _Toy(torch.nn.Module):
    """Token t's module input is row t of ``table``; one linear ``proj`` (3 → 2) carries the LoRA."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(table, freeze=True)
        self.proj = torch.nn.Linear(table.shape[1], 2, bias=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        return self.proj(self.embed(input_ids))


def _toy(table, a, b=None):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_Toy(torch.tensor(table)), LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0,
                                                                  target_modules=["proj"])).eval()
    with torch.no_grad():
        model.base_model.model.proj.lora_A["default"].weight.copy_(torch.tensor(a))
        model.base_model.model.proj.lora_B["default"].weight.copy_(torch.tensor(b if b is not None else [[1., 0.],
                                                                                                          [0., 1.]]))
    return model


def _ids(*tokens):
    return {"input_ids": torch.tensor([tokens])}


# A1: sequence 1 = tokens 0, 1 → x = [1, 0, 2], [1, 1, 0]; sequence 2 = token 2 → x = [0, 2, 1]; token 3 = padding
A1_TABLE = [[1., 0., 2.], [1., 1., 0.], [0., 2., 1.], [9., 9., 9.]]
A1_A = [[1., -2., 0.5], [3., 0.1, -1.]]
A1_PADDED = {"input_ids": torch.tensor([[0, 1], [2, 3]]), "attention_mask": torch.tensor([[1, 1], [1, 0]])}


def test_a1_statistics_scores_mask_and_pruned_lora_a():
    model = _toy(A1_TABLE, A1_A)
    s = harmful_input_statistics(model, [_ids(0, 1), _ids(2)])
    assert torch.allclose(s[A_KEY], torch.tensor([1., 2.5, 2.5]))
    assert torch.allclose(harmful_input_statistics(model, [A1_PADDED])[A_KEY], s[A_KEY])  # padding masked
    scores = antidote_scores(torch.tensor(A1_A), s[A_KEY])
    assert torch.allclose(scores, torch.tensor([[1., 3.162278, 0.790569], [3., 0.158114, 1.581139]]), atol=1e-6)
    state, masks, records = antidote(model, [A1_PADDED], dense_ratio=0.5)
    assert masks[A_KEY].int().tolist() == [[1, 1, 0], [1, 0, 1]]
    assert torch.equal(state[A_KEY], torch.tensor([[0., 0., 0.5], [0., 0.1, 0.]]))
    rec = next(r for r in records if r["key"] == A_KEY)
    assert (rec["marked"], rec["total"], rec["matrix"]) == (4, 6, "A")
    for third in (1 / 3, Fraction(1, 3)):
        assert kept_count(3, third) == 2
        assert antidote(model, [A1_PADDED], dense_ratio=third)[1][A_KEY].int().tolist() == [[0, 1, 0], [1, 0, 0]]


def test_a2_lora_b_sees_z_before_kappa():
    table = [[1., 2., 1.], [0., 1., 2.]]
    a, b = [[1., 0., -1.], [0.5, 1., 0.]], [[2., -1.], [0., 3.]]
    model = _toy(table, a, b)
    s = harmful_input_statistics(model, [_ids(0, 1)])
    assert torch.allclose(s[B_KEY], torch.tensor([4., 7.25]))
    scores = antidote_scores(torch.tensor(b), s[B_KEY])
    assert torch.allclose(scores, torch.tensor([[4., 2.692582], [0., 8.077747]]), atol=1e-6)
    state, masks, _ = antidote(model, [_ids(0, 1)], dense_ratio=0.5)
    assert masks[B_KEY].int().tolist() == [[1, 0], [0, 1]]
    assert torch.equal(state[B_KEY], torch.tensor([[0., -1.], [0., 0.]]))


def test_a2_statistics_do_not_depend_on_kappa():
    from peft import LoraConfig, get_peft_model

    table, a = torch.tensor([[1., 2., 1.], [0., 1., 2.]]), torch.tensor([[1., 0., -1.], [0.5, 1., 0.]])
    model = get_peft_model(_Toy(table), LoraConfig(r=2, lora_alpha=16, target_modules=["proj"])).eval()
    with torch.no_grad():
        model.base_model.model.proj.lora_A["default"].weight.copy_(a)
    assert torch.allclose(harmful_input_statistics(model, [_ids(0, 1)])[B_KEY], torch.tensor([4., 7.25]))


@pytest.mark.parametrize("d_in, kept, marked", [(256, 230, 26), (4096, 3686, 410), (14336, 12902, 1434)])
def test_a3_counts(d_in, kept, marked):
    assert kept_count(d_in, 0.1) == kept
    scores = torch.rand(3, d_in, generator=torch.Generator().manual_seed(d_in))
    assert harmful_mask(scores, 0.1).sum(1).tolist() == [marked] * 3


def test_float_product_is_guarded():
    assert math.floor(10 * (1 - 0.9)) == 0 and kept_count(10, 0.9) == 1  # 10·0.0999… would keep none
    assert kept_count(100, 0.57) == 43 and kept_count(8, 0.05) == 7 and kept_count(1, 0.1) == 0


def test_row_and_matrix_grouping():
    scores = torch.tensor([[1., 2.], [10., 20.]])
    assert harmful_mask(scores, 0.5, group="row").int().tolist() == [[0, 1], [0, 1]]
    assert harmful_mask(scores, 0.5, group="matrix").int().tolist() == [[0, 0], [1, 1]]


def test_ties_keep_the_lower_index():
    assert harmful_mask(torch.ones(2, 4), 0.5).int().tolist() == [[0, 0, 1, 1]] * 2
    assert harmful_mask(torch.tensor([[3., 1., 1., 0.]]), 0.5).int().tolist() == [[1, 0, 1, 0]]
    assert harmful_mask(torch.ones(2, 2), 0.5, group="matrix").int().tolist() == [[0, 0], [1, 1]]


RATIOS = st.one_of(st.integers(1, 99).map(lambda i: i / 100), st.floats(1e-4, 0.9999))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 70), ratio=RATIOS, seed=st.integers(0, 1000),
       levels=st.integers(1, 5))
def test_property_exact_kept_count_per_row(rows, cols, ratio, seed, levels):
    scores = torch.randint(0, levels, (rows, cols), generator=torch.Generator().manual_seed(seed)).float()
    k = math.floor(cols * (1 - Fraction(repr(ratio))))
    mask = harmful_mask(scores, ratio)
    assert (~mask).sum(1).tolist() == [k] * rows
    for row, m in zip(scores, mask):
        if m.any() and (~m).any():
            assert row[~m].max() <= row[m].min()  # the kept are the lowest
            top = row[~m].max()
            assert (torch.nonzero(~m & (row == top)).max() < torch.nonzero(m & (row == top)).min()
                    if (m & (row == top)).any() else True)  # ties: the lower index is kept
    assert int((~harmful_mask(scores, ratio, group="matrix")).sum()) == math.floor(rows * cols
                                                                                  * (1 - Fraction(repr(ratio))))


def test_prune_adapter_zeroes_marked_entries_only():
    state = {A_KEY: torch.tensor([[1., -2.], [3., 4.]], dtype=torch.bfloat16), "other": torch.ones(3)}
    out = prune_adapter(state, {A_KEY: torch.tensor([[True, False], [False, True]])})
    assert out[A_KEY].dtype == torch.bfloat16 and out[A_KEY].float().tolist() == [[0., -2.], [3., 0.]]
    assert out["other"] is state["other"] and state[A_KEY][0, 0] == 1
    with pytest.raises(ValueError, match="names no tensor"):
        prune_adapter(state, {B_KEY: torch.zeros(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        prune_adapter(state, {A_KEY: torch.zeros(2, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        prune_adapter(state, {A_KEY: torch.zeros(2, 2)})


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"])
def test_dense_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match=r"dense_ratio.*\(0, 1\)"):
        harmful_mask(torch.ones(1, 4), ratio)


def test_clear_errors():
    model = _toy(A1_TABLE, A1_A)
    with pytest.raises(ValueError, match="calibration data"):
        antidote(model, [])
    with pytest.raises(ValueError, match="allowed: row, matrix"):
        harmful_mask(torch.ones(1, 4), 0.1, group="column")
    with pytest.raises(ValueError, match="allowed: row, matrix"):
        antidote(model, [A1_PADDED], group="column")
    with pytest.raises(ValueError, match="right-padded"):
        harmful_input_statistics(model, [{"input_ids": torch.tensor([[3, 2], [0, 1]]),
                                          "attention_mask": torch.tensor([[0, 1], [1, 1]])}])
    with pytest.raises(ValueError, match="without any token"):
        harmful_input_statistics(model, [{"input_ids": torch.tensor([[0, 1]]), "attention_mask": torch.zeros(1, 2)}])
    with pytest.raises(ValueError, match="LoRA factors"):
        harmful_input_statistics(_Toy(torch.tensor(A1_TABLE)), [_ids(0, 1)])
    with pytest.raises(ValueError, match="d_in"):
        antidote_scores(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        harmful_mask(torch.tensor([[1., float("nan")]]), 0.5)


# ----------------------------------------------------------------------------------------- tiny PEFT Llama
def _sequences():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 64, (n,), generator=g) for n in (5, 3, 7)]


def _padded(seqs):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def llama():
    return tiny_peft_llama(PROJ)


def test_padded_batch_equals_batch_size_one(llama, one_torch_thread):
    seqs = _sequences()
    single = harmful_input_statistics(llama, [{"input_ids": s[None]} for s in seqs])
    batched = harmful_input_statistics(llama, [_padded(seqs)])
    assert single.keys() == batched.keys() and len(single) == 2 * 2 * len(PROJ)
    for key in single:
        assert torch.allclose(single[key], batched[key], rtol=1e-5, atol=1e-6), key


def test_statistics_match_hand_hooks(llama, one_torch_thread):
    """s over x for lora_A and over z = A·x (unscaled) for lora_B, averaged over sequences (D-A4)."""
    seqs, name = _sequences(), "base_model.model.model.layers.1.mlp.down_proj"
    layer = llama.get_submodule(name)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = layer.lora_A["default"].register_forward_hook(lambda m, i, o: seen.append((i[0][0], o[0])))
    try:
        with torch.no_grad():
            for s in seqs:
                llama(input_ids=s[None])
    finally:
        handle.remove()
    s = harmful_input_statistics(llama, [_padded(seqs)])
    expect_a = sum(x.square().sum(0) for x, _ in seen) / len(seqs)
    expect_b = sum(z.square().sum(0) for _, z in seen) / len(seqs)
    assert torch.allclose(s[f"{name}.lora_A.weight"], expect_a, rtol=1e-5)
    assert torch.allclose(s[f"{name}.lora_B.weight"], expect_b, rtol=1e-5)


@pytest.mark.parametrize("group", ["row", "matrix"])
def test_end_to_end_pruned_adapter_loads_with_peft(llama, tmp_path, group, one_torch_thread):
    from peft import PeftModel

    before = lora_weights(llama)
    state, masks, records = antidote(llama, [_padded(_sequences())], dense_ratio=0.1, group=group)
    assert all(torch.equal(v, lora_weights(llama)[k]) for k, v in before.items())  # the model is untouched
    assert set(state) == set(masks) == set(before) and len(records) == len(masks)
    for rec in records:
        mask, rows, cols = masks[rec["key"]], rec["rows"], rec["cols"]
        if group == "row":
            assert mask.sum(1).tolist() == [cols - kept_count(cols, 0.1)] * rows
            assert 0.1 <= rec["fraction"] < 0.1 + 1 / cols
        else:
            assert rec["marked"] == rows * cols - kept_count(rows * cols, 0.1)
        assert rec["fraction"] == rec["marked"] / rec["total"]
        assert torch.equal(state[rec["key"]], before[rec["key"]].masked_fill(mask, 0))

    llama.save_pretrained(tmp_path / "finetuned")
    saved, config = read_adapter(tmp_path / "finetuned")
    assert set(saved) == set(state)
    save_antidote(tmp_path / "antidote", state, config, masks, records, dense_ratio=0.1, group=group)
    loaded_mask, meta = load_mask(tmp_path / "antidote" / MASK_FILE)
    assert all(torch.equal(loaded_mask[k], masks[k]) for k in masks) and meta["scorer"] == "antidote"
    assert not list((tmp_path / "antidote").glob("*.bin")) and not list((tmp_path / "antidote").glob("*.pt"))
    base = copy.deepcopy(llama).unload()
    pruned = PeftModel.from_pretrained(base, tmp_path / "antidote").eval()
    assert all(torch.equal(v, state[k]) for k, v in lora_weights(pruned).items())
    with torch.no_grad():
        logits = pruned(input_ids=_sequences()[0][None]).logits
    assert torch.isfinite(logits).all()
