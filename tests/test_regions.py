"""Safety-region scorers and masks (spec nlsr.md §4, §10; merging.md §3; DESIGN.md §4-6).

Hand-worked values first, then the properties of the selection rules and of the low-rank projection, then every
scorer on a tiny random Llama with a random nonzero LoRA, mask files, calibration batches and the benchmark.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import nlsr_lib.regions as R
from conftest import tiny_peft_llama
from nlsr_lib import names
from nlsr_lib.config import ParamsError, load_params, params_from_dict
from nlsr_lib.counts import kept_by_sparsity
from nlsr_lib.regions.lowrank import output_directions, principal_directions, project_onto, project_out
from nlsr_lib.regions.selection import magnitude_keep_mask, rowwise_keep_mask, set_difference_mask

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KEY = "base_model.model.model.layers.{}.{}.{}.lora_{}.weight"


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two on a shared 2-core machine (no OpenMP spin contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama (hidden 32, 2 layers) with a rank-4 LoRA whose A and B are random and nonzero."""
    return tiny_peft_llama(PROJ)


def _batch(seed: int, n: int = 3, t: int = 12, prompt: int = 5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, t), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask = torch.ones_like(ids)
    mask[-1, t - 3:] = 0  # the last row is right-padded
    labels[-1, t - 3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def batches():
    return [_batch(10), _batch(11)]


@pytest.fixture(scope="module")
def utility_batches():
    return [_batch(20), _batch(21)]


@pytest.fixture(scope="module")
def pref_batches():
    c, r = _batch(30), _batch(31)
    return [{**{f"chosen_{k}": v for k, v in c.items()}, **{f"rejected_{k}": v for k, v in r.items()}}]


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in R.lora_weights(model).items())


# --------------------------------------------------------------------------------------------- hand values (§10)
def test_rowwise_selection_hand_value():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    scores = w.abs() * torch.tensor([1.0, 1.0, 0.1, 2.0])  # [1, 2, 0.3, 1]
    assert rowwise_keep_mask(scores, 0.5).tolist() == [[False, True, False, True]]
    assert rowwise_keep_mask(scores, 0.5, tie_rule="reference").tolist() == [[False, True, False, True]]


def test_magnitude_mask_hand_values():
    w = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3])
    assert magnitude_keep_mask(w, 0.4, tie_rule="reference").tolist() == [False, True, False, True, False]
    assert magnitude_keep_mask(w, 0.4).tolist() == [False, True, False, True, True]  # keeps ⌈0.6·5⌉ = 3


def test_magnitude_mask_counts_on_a_128x4096_matrix():
    scores = torch.randperm(128 * 4096, generator=torch.Generator().manual_seed(0)).float().reshape(128, 4096)
    assert int(magnitude_keep_mask(scores, 0.8, tie_rule="reference").sum()) == 104_857  # spec §10
    assert int(magnitude_keep_mask(scores, 0.8).sum()) == 104_858 == math.ceil(0.2 * 128 * 4096)


def test_kept_by_sparsity_is_exact_in_decimal():
    assert kept_by_sparsity(100, 0.57) == 43  # float 100·0.57 = 56.999…
    assert kept_by_sparsity(10, 0.7) == 3 and kept_by_sparsity(4096, 0.8) == 820 and kept_by_sparsity(128, 0.8) == 26
    assert kept_by_sparsity(5, 0.0) == 5
    with pytest.raises(ValueError, match="sparsity"):
        kept_by_sparsity(5, 1.0)


def test_reference_rules_differ_from_default_where_the_spec_says():
    # row-wise reference prunes exact zeros of the weight as well (get_mask reads weight == 0)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    weight = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert rowwise_keep_mask(scores, 0.25, tie_rule="reference", weight=weight).tolist() == [[False, True, True, False]]
    # per matrix with threshold 0: zeros pruned at random with probability s / frac_zero, nothing else
    scores = torch.zeros(1000)
    scores[:100] = 1.0
    keep = magnitude_keep_mask(scores, 0.5, tie_rule="reference", generator=torch.Generator().manual_seed(0))
    assert keep[:100].all() and 0.3 < 1 - keep[100:].float().mean().item() < 0.8
    again = magnitude_keep_mask(scores, 0.5, tie_rule="reference", generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_set_difference_hand_value():
    safety = torch.tensor([[9.0, 8.0, 7.0, 1.0, 0.0]])
    utility = torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.0]])
    # top ⌊0.6·5⌋ = 3 safety entries {0, 1, 2} minus the top ⌊0.2·5⌋ = 1 utility entry {0}
    assert set_difference_mask(safety, utility, q=0.6, p=0.2).tolist() == [[False, True, True, False, False]]


def test_statistic_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert R.statistic_positions(labels, "response").tolist() == [[False, False, True, True, False]]
    assert R.statistic_positions(labels, "predicting").tolist() == [[False, True, True, False, False]]
    with pytest.raises(ValueError, match="response, predicting"):
        R.statistic_positions(labels, "tokens")


def test_dpo_loss_hand_value():
    zero = torch.tensor(0.0)
    assert R.dpo_loss(zero, zero, zero, zero).item() == pytest.approx(math.log(2))
    # chosen gains 10 nats over the reference, rejected unchanged: -log σ(0.1·10)
    assert R.dpo_loss(torch.tensor(-1.0), zero, torch.tensor(-11.0), zero).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-1.0))))


# --------------------------------------------------------------------------------------------- selection properties
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), s100=st.integers(0, 99), seed=st.integers(0, 1000),
       levels=st.integers(1, 5))
def test_selection_keeps_exact_counts_and_the_largest_scores(rows, cols, s100, seed, levels):
    s = s100 / 100
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, cols), generator=gen).float()  # many ties
    keep = rowwise_keep_mask(scores, s)
    assert (keep.sum(1) == kept_by_sparsity(cols, s)).all()
    for r in range(rows):
        if keep[r].any() and (~keep[r]).any():
            assert scores[r][keep[r]].min() >= scores[r][~keep[r]].max()
    flat = magnitude_keep_mask(scores, s)
    assert int(flat.sum()) == kept_by_sparsity(rows * cols, s)
    stable = torch.zeros(rows * cols, dtype=torch.bool)  # the O(n) threshold rule == a stable ascending sort
    stable[torch.sort(scores.flatten(), stable=True).indices[rows * cols - kept_by_sparsity(rows * cols, s):]] = True
    assert torch.equal(flat.flatten(), stable)
    if flat.any() and (~flat).any():
        assert scores[flat].min() >= scores[~flat].max()


def test_ties_are_broken_by_index():
    assert rowwise_keep_mask(torch.ones(1, 5), 0.4).tolist() == [[False, False, True, True, True]]
    assert magnitude_keep_mask(torch.ones(2, 2), 0.5).tolist() == [[False, False], [True, True]]


# --------------------------------------------------------------------------------------------- low-rank math
@settings(max_examples=30, deadline=None)
@given(o=st.integers(1, 12), k=st.integers(1, 6), q_frac=st.floats(0, 1), seed=st.integers(0, 1000))
def test_output_directions_match_the_dense_eigendecomposition(o, k, q_frac, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(o, k, generator=gen, dtype=torch.float64)
    x = torch.randn(3 * k + 2, k, generator=gen, dtype=torch.float64)
    sigma = x.T @ x
    q = math.floor(min(o, k) * q_frac)
    v, vals = output_directions(w, sigma, q)
    assert v.shape == (o, q) and vals.shape == (q,)
    torch.testing.assert_close(v.T @ v, torch.eye(q), atol=1e-5, rtol=0)
    dense_vals, dense_vecs = torch.linalg.eigh(w @ sigma @ w.T)
    torch.testing.assert_close(vals.double(), dense_vals.flip(0)[:q], atol=1e-6 * (1 + dense_vals.max()), rtol=1e-5)
    projected = project_onto(w.float(), v)
    assert torch.linalg.matrix_rank(projected, atol=1e-4) <= q
    torch.testing.assert_close(projected + project_out(w.float(), v), w.float(), atol=1e-5, rtol=0)
    # top-q eigenvalues separated from the rest => the same subspace as the dense decomposition
    all_vals = dense_vals.flip(0)
    if 0 < q < o and all_vals[q - 1] - all_vals[q] > 1e-3 * (1 + all_vals[0]):
        ref = dense_vecs.flip(1)[:, :q].float()
        torch.testing.assert_close(v @ v.T, ref @ ref.T, atol=1e-4, rtol=0)


def test_keeping_every_direction_is_the_identity():
    gen = torch.Generator().manual_seed(0)
    for o, k in ((20, 4), (4, 9)):
        w = torch.randn(o, k, generator=gen)
        x = torch.randn(30, k, generator=gen)
        v, _ = output_directions(w, x.T @ x, min(o, k))
        torch.testing.assert_close(project_onto(w, v), w, atol=1e-5, rtol=0)


def test_randomized_svd_is_seeded_and_close_to_exact():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(30, 8, generator=gen)
    x = torch.randn(50, 8, generator=gen) * torch.linspace(3, 0.1, 8)
    sigma = x.T @ x
    v1, _ = output_directions(w, sigma, 3, svd="randomized", niter=20, seed=5)
    v2, _ = output_directions(w, sigma, 3, svd="randomized", niter=20, seed=5)
    ve, _ = output_directions(w, sigma, 3)
    assert torch.equal(v1, v2)
    torch.testing.assert_close(v1 @ v1.T, ve @ ve.T, atol=1e-3, rtol=0)
    g1, _ = principal_directions(sigma, 3, svd="randomized", seed=1)
    ge, _ = principal_directions(sigma, 3)
    torch.testing.assert_close(g1 @ g1.T, ge @ ge.T, atol=1e-3, rtol=0)


def test_randomized_svd_gives_the_exact_eigenvalues_and_subspace():
    """``svd: randomized`` == ``svd: exact`` up to approximation, eigenvalues included, on every path: a Gram
    (the A matrices), ``W Σ Wᵀ`` with o ≤ k (formed) and o > k (the factor route). The Gram path used to return
    the squared eigenvalues (the singular values of a PSD matrix are already its eigenvalues)."""
    gen = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.tensor([9.0, 4.0, 2.0, 0.05, 0.02, 0.01], dtype=torch.float64)
    sigma = basis @ torch.diag(spectrum) @ basis.T
    ge, ve = principal_directions(sigma, 3)
    torch.testing.assert_close(ve.double(), spectrum[:3], atol=1e-5, rtol=1e-5)
    gr, vr = principal_directions(sigma, 3, svd="randomized", niter=20, seed=1)
    torch.testing.assert_close(vr, ve, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gr @ gr.T, ge @ ge.T, atol=1e-4, rtol=0)
    for o in (4, 12):  # o ≤ k (via principal_directions) and o > k (thin QR / factor route)
        w = torch.randn(o, 6, generator=gen, dtype=torch.float64)
        de, le = output_directions(w, sigma, 3)
        dr, lr = output_directions(w, sigma, 3, svd="randomized", niter=20, seed=2)
        torch.testing.assert_close(lr, le, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dr @ dr.T, de @ de.T, atol=1e-4, rtol=0)


def test_gram_directions_equal_those_of_raw_activations(model, batches):
    """ActSVD on stored activations (spec §4.6 step A: V = right singular vectors of Y = X Wᵀ) == the Gram route."""
    name = "base_model.model.model.layers.1.mlp.gate_proj"
    layer = dict(model.named_modules())[name]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    rows = []
    handle = layer.lora_A["default"].register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    x = torch.cat([r[batch["labels"] != -100] for r, batch in zip(rows, batches)]).double()
    result = R.low_rank_subspaces(model, batches, rank_keep_ratio=0.5, show_progress=False)
    for w, key in ((a, f"{name}.lora_A.weight"), (b, f"{name}.lora_B.weight")):
        y = x @ a.double().T if w is a else (x @ a.double().T) @ b.double().T
        q = math.floor(min(w.shape) * 0.5)
        v_raw = torch.linalg.svd(y, full_matrices=False).Vh[:q].T.float()
        v = result.bases[key]
        torch.testing.assert_close(v @ v.T, v_raw @ v_raw.T, atol=1e-4, rtol=0)
        torch.testing.assert_close(result.projected[key], (v_raw @ v_raw.T) @ w.float(), atol=1e-4, rtol=0)
        assert torch.linalg.matrix_rank(result.projected[key], atol=1e-5) <= q


def test_low_rank_at_full_rank_keeps_the_adapter(model, batches):
    result = R.low_rank_subspaces(model, batches, rank_keep_ratio=1.0, show_progress=False)
    weights = R.lora_weights(model)
    for key, w in weights.items():
        torch.testing.assert_close(result.projected[key], w, atol=1e-5, rtol=1e-5)


def test_subspaces_round_trip(tmp_path, model, batches):
    result = R.low_rank_subspaces(model, batches, show_progress=False)
    R.save_subspaces(tmp_path / "bases.safetensors", result.bases, {"rank_keep_ratio": 0.8})
    bases, meta = R.load_subspaces(tmp_path / "bases.safetensors")
    assert meta == {"rank_keep_ratio": "0.8"}
    assert all(torch.equal(bases[k], v) for k, v in result.bases.items())


# --------------------------------------------------------------------------------------------- scorers on a model
def _expected_kept(name: str, shape: tuple[int, int], s: float) -> int:
    if R.get_scorer(name).selection == "rowwise":
        return shape[0] * kept_by_sparsity(shape[1], s)
    return kept_by_sparsity(shape[0] * shape[1], s)


@pytest.mark.parametrize("name", ["wanda", "snip", "preference_snip", "random", "low_rank"])
def test_every_scorer_keeps_the_exact_count_and_leaves_the_model_alone(name, model, batches, pref_batches):
    before = R.lora_weights(model)
    data = pref_batches if R.get_scorer(name).data == "preference" else batches
    scores = R.score(name, model, data, show_progress=False)
    assert list(scores) == list(before)
    for key, s in scores.items():
        assert s.dtype == torch.float32 and s.shape == before[key].shape and torch.isfinite(s).all()
    masks = R.build_mask(name, model, data, 0.8, show_progress=False)
    for key, m in masks.items():
        assert m.dtype == torch.bool and int(m.sum()) == _expected_kept(name, tuple(m.shape), 0.8), key
    assert _unchanged(model, before)
    again = R.build_mask(name, model, data, 0.8, show_progress=False)
    assert all(torch.equal(masks[k], again[k]) for k in masks)  # deterministic


@pytest.mark.parametrize("name", ["wanda_set_difference", "snip_set_difference"])
def test_set_difference_scorers(name, model, batches, utility_batches):
    base = R.get_scorer(name).base
    safety = R.score(base, model, batches, show_progress=False)
    utility = R.score(base, model, utility_batches, show_progress=False)
    masks = R.build_mask(name, model, batches, utility_batches=utility_batches, q=0.3, p=0.2, show_progress=False)
    for key, m in masks.items():
        n = m.numel()
        top_s = set(torch.argsort(safety[key].flatten(), stable=True)[n - math.floor(0.3 * n):].tolist())
        top_u = set(torch.argsort(utility[key].flatten(), stable=True)[n - math.floor(0.2 * n):].tolist())
        assert set(m.flatten().nonzero().flatten().tolist()) == top_s - top_u
    with pytest.raises(ValueError, match="utility_batches"):
        R.build_mask(name, model, batches)


def test_wanda_scores_by_hand(model, batches):
    name = "base_model.model.model.layers.0.self_attn.v_proj"
    layer = dict(model.named_modules())[name]
    inputs = []
    handle = layer.lora_A["default"].register_forward_hook(lambda _m, inp, out: inputs.append((inp[0], out)))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    x = torch.cat([i[b["labels"] != -100] for (i, _), b in zip(inputs, batches)])
    z = torch.cat([o[b["labels"] != -100] for (_, o), b in zip(inputs, batches)])
    scores = R.score("wanda", model, batches, show_progress=False)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    torch.testing.assert_close(scores[f"{name}.lora_A.weight"], a.abs() * x.norm(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores[f"{name}.lora_B.weight"], b.abs() * z.norm(dim=0), rtol=1e-5, atol=1e-6)
    predicting = R.score("wanda", model, batches, positions="predicting", show_progress=False)
    assert not torch.equal(predicting[f"{name}.lora_A.weight"], scores[f"{name}.lora_A.weight"])


def test_snip_per_sample_versus_cumulative(model):
    batch = _batch(40, n=2)
    params = [m.weight for m in R.lora_matrices(model)]
    grads = []
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        for p in params:
            p.requires_grad_(True)
        loss = model(input_ids=batch["input_ids"][i][keep][None], labels=batch["labels"][i][keep][None]).loss
        grads.append(torch.autograd.grad(loss, params))
        for p in params:
            p.requires_grad_(False)
    per_sample = R.score("snip", model, [batch], show_progress=False)
    cumulative = R.score("snip", model, [batch], cumulative_grad=True, show_progress=False)
    for j, m in enumerate(R.lora_matrices(model)):
        w = m.weight.detach().abs()
        g1, g2 = grads[0][j], grads[1][j]
        torch.testing.assert_close(per_sample[m.key], w * (g1.abs() + g2.abs()), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(cumulative[m.key], w * (g1.abs() + (g1 + g2).abs()), rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(per_sample[k], cumulative[k]) for k in per_sample)


def test_preference_snip_uses_the_disabled_adapter_as_reference(model, pref_batches):
    b = pref_batches[0]
    ids, mask, labels = b["chosen_input_ids"][:1], b["chosen_attention_mask"][:1], b["chosen_labels"][:1]
    with torch.no_grad():
        with model.disable_adapter():
            ref = R.sequence_logps(model, ids, mask, labels)
            base_logits = model(input_ids=ids).logits
        policy = R.sequence_logps(model, ids, mask, labels)
    logp = torch.log_softmax(base_logits[0, :-1], -1)
    target = labels[0, 1:]
    by_hand = sum(logp[t, target[t]] for t in range(target.numel()) if target[t] != -100)
    assert ref.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert ref.item() != pytest.approx(policy.item())
    pref = R.score("preference_snip", model, pref_batches, show_progress=False)
    assert all(s.abs().sum() > 0 for s in pref.values())


def test_random_scores_depend_on_the_seed_only(model):
    a = R.score("random", model, None, seed=1)
    assert all(torch.equal(a[k], v) for k, v in R.score("random", model, None, seed=1).items())
    assert not torch.equal(next(iter(a.values())), next(iter(R.score("random", model, None, seed=2).values())))


@pytest.mark.parametrize("name", ["wanda", "low_rank"])
def test_propagate_matches_layer_zero_and_restores_the_model(name, model, batches):
    before = R.lora_weights(model)
    opts = {"mask_sparsity": 0.5} if name == "wanda" else {"rank_keep_ratio": 0.5}
    plain = R.score(name, model, batches, show_progress=False, **opts)
    prop = R.score(name, model, batches, propagate=True, show_progress=False, **opts)
    assert _unchanged(model, before)
    assert list(prop) == list(plain)
    for key in plain:
        if ".layers.0." in key:
            torch.testing.assert_close(prop[key], plain[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(prop[k], plain[k], rtol=1e-3) for k in plain if ".layers.1." in k)


def test_scoring_errors(model, batches):
    with pytest.raises(ValueError, match="registered: wanda"):
        R.score("magnitude", model, batches)
    with pytest.raises(TypeError, match="does not take"):
        R.score("snip", model, batches, rank_keep_ratio=0.5)
    with pytest.raises(ValueError, match="pass mask_sparsity"):
        R.score("wanda", model, batches, propagate=True, show_progress=False)
    empty = {k: (v if k != "labels" else torch.full_like(v, -100)) for k, v in batches[0].items()}
    with pytest.raises(ValueError, match="no statistic positions"):
        R.score("low_rank", model, [empty], show_progress=False)
    with pytest.raises(ValueError, match="no LoRA modules"):
        R.score("random", torch.nn.Linear(2, 2), None)


def test_register_a_new_scorer(model, batches, monkeypatch):
    monkeypatch.setattr(R.SCORERS, "declared", None)  # a throwaway scorer; a real one is declared in nlsr_lib/names.py

    @R.register_scorer("weight_magnitude_test", selection="matrix", data="none")
    def magnitude(model, batches=None, show_progress=True):
        """|W| (a data-free scorer registered in one line)."""
        return {k: w.abs() for k, w in R.lora_weights(model).items()}

    try:
        masks = R.build_mask("weight_magnitude_test", model, None, 0.5)
        assert R.overall_density(masks) == pytest.approx(0.5, abs=0.02)
    finally:
        R.SCORERS.unregister("weight_magnitude_test")


def test_registry_matches_the_config_choices():
    assert R.SCORERS.names() == names.REGION_SCORERS.names()
    cfg = load_params("params/smoke.yaml").regions
    assert R.scorer_options(cfg, "low_rank") == {"rank_keep_ratio": 0.8, "svd": "exact", "niter": 20, "seed": 42,
                                                 "positions": "response", "propagate": False}
    assert R.scorer_options(cfg, "snip") == {"cumulative_grad": False}
    assert R.scorer_options(cfg, "preference_snip") == {"cumulative_grad": False, "beta": 0.1}


def test_regions_config_validation():
    base = load_params("params/smoke.yaml").to_dict()
    magic = r"regions.scorers\[0\]: unknown region scorer 'magic'; registered: wanda"
    for bad, match in (({"scorers": ["magic"]}, magic), ({"mask_sparsity": 1.0}, "out of range"),
                       ({"svd": "lanczos"}, "exact, randomized"), ({"tie_rule": "floor"}, "index, reference")):
        with pytest.raises(ParamsError, match=match):
            params_from_dict({**base, "regions": {**base["regions"], **bad}})


# --------------------------------------------------------------------------------------------- mask files
def test_mask_round_trip_and_statistics(tmp_path, model, batches):
    masks = R.build_mask("wanda", model, batches, 0.5, show_progress=False)
    meta = R.mask_metadata("wanda", "expo/dpo", 0.5, "abc", positions="response")
    path = R.save_mask(tmp_path / "m.safetensors", masks, meta)
    loaded, loaded_meta = R.load_mask(path, R.lora_weights(model))
    assert loaded_meta == {"scorer": "wanda", "reference": "expo/dpo", "mask_sparsity": "0.5",
                           "calibration_hash": "abc", "positions": "response"}
    assert list(loaded) == list(masks) and all(torch.equal(loaded[k], masks[k]) for k in masks)
    assert R.overall_density(loaded) == pytest.approx(0.5)
    records = R.density_records(loaded)
    assert len(records) == 28 and records[0]["layer"] == 0 and records[0]["module"] == "q_proj"
    assert records[0]["matrix"] == "A" and records[0]["density"] == 0.5
    layers = R.layer_density_records(loaded)
    assert len(layers) == 14 and {r["module"] for r in layers} == set(PROJ)
    assert sum(r["kept"] for r in layers) == sum(int(m.sum()) for m in masks.values())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves nothing behind


def test_load_mask_errors_name_the_module_and_shapes(tmp_path):
    ka, kb = KEY.format(0, "self_attn", "q_proj", "A"), KEY.format(0, "self_attn", "q_proj", "B")
    path = R.save_mask(tmp_path / "m.safetensors", {ka: torch.ones(4, 32, dtype=torch.bool),
                                                    kb: torch.zeros(32, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight: mask shape \(4, 32\) does not match adapter shape "
                                         r"\(8, 32\)"):
        R.load_mask(path, {ka: (8, 32), kb: (32, 4)})
    kv = KEY.format(0, "self_attn", "v_proj", "A")
    with pytest.raises(ValueError, match=r"no mask for 1 LoRA matrix .*v_proj.lora_A.weight \(shape \(4, 32\)\)"):
        R.load_mask(path, {ka: torch.zeros(4, 32), kb: torch.zeros(32, 4), kv: torch.zeros(4, 32)})
    with pytest.raises(ValueError, match=r"1 mask entry not in the adapter, e.g. .*q_proj.lora_B.weight"):
        R.load_mask(path, {ka: (4, 32)})
    with pytest.raises(TypeError, match="bool"):
        R.save_mask(tmp_path / "x.safetensors", {ka: torch.ones(4, 32)})
    with pytest.raises(ValueError, match="not a LoRA matrix key"):
        R.save_mask(tmp_path / "x.safetensors", {"lm_head.weight": torch.ones(4, 32, dtype=torch.bool)})
    with pytest.raises(FileNotFoundError):
        R.load_mask(tmp_path / "missing.safetensors")


def test_reference_code_keys_are_accepted(tmp_path):
    key = "base_model.model.model.layers.3.mlp.down_proj.lora_B.default"
    path = R.save_mask(tmp_path / "m.safetensors", {key: torch.ones(2, 2, dtype=torch.bool)})
    masks, _ = R.load_mask(path, {"base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight": (2, 2)})
    assert list(masks) == ["base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"]


def test_jaccard_and_intersection():
    a = {"x.lora_A.weight": torch.tensor([[True, True, False, False]])}
    b = {"x.lora_A.weight": torch.tensor([[True, False, True, False]])}
    assert R.jaccard(a, b) == pytest.approx(1 / 3)
    assert R.intersection(a, b)["x.lora_A.weight"].tolist() == [[True, False, False, False]]
    assert R.jaccard(a, a) == 1.0
    empty = {"x.lora_A.weight": torch.zeros(1, 4, dtype=torch.bool)}
    assert R.jaccard(empty, empty) == 1.0
    with pytest.raises(ValueError, match="different matrices"):
        R.jaccard(a, {"y.lora_A.weight": torch.zeros(1, 4, dtype=torch.bool)})


# --------------------------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def tokenizer():
    from nlsr_lib.data.templates import alpaca_prompt
    from nlsr_lib.tiny.model import train_tokenizer

    texts = [alpaca_prompt(f"How do I bake bread number {i}?") + " Mix flour and water, then bake it." for i in
             range(30)]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return train_tokenizer(texts, 300, d)


ROWS = [{"instruction": f"How do I bake bread number {i}?", "input": "", "output": " Mix flour, then bake it."}
        for i in range(10)]


def test_calibration_tokens_match_training(tokenizer):
    from nlsr_lib.data.templates import alpaca_prompt
    from nlsr_lib.tiny.model import encode_pairs

    prompt = alpaca_prompt(ROWS[0]["instruction"])
    enc = R.encode_pair(tokenizer, prompt, ROWS[0]["output"])
    assert enc["input_ids"] == encode_pairs(tokenizer, [(prompt, ROWS[0]["output"])], 1024)[0]  # BOS … EOS
    assert enc["input_ids"][0] == tokenizer.bos_token_id and enc["input_ids"].count(tokenizer.bos_token_id) == 1
    assert enc["input_ids"][-1] == tokenizer.eos_token_id
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert enc["labels"][:n_prompt] == [-100] * n_prompt and enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tokenizer.decode(enc["input_ids"][n_prompt:], skip_special_tokens=True) == ROWS[0]["output"]
    cut = R.encode_pair(tokenizer, prompt, ROWS[0]["output"], max_length=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and cut["labels"][-2:] == cut["input_ids"][-2:]


def test_calibration_batches(tokenizer):
    batches = R.calibration_batches(tokenizer, ROWS, n=5, seed=42, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    again = R.calibration_batches(tokenizer, ROWS, n=5, seed=42, batch_size=2)
    assert R.batches_hash(batches) == R.batches_hash(again)
    other = R.calibration_batches(tokenizer, ROWS, n=5, seed=7, batch_size=2)
    assert R.batches_hash(batches) != R.batches_hash(other)
    for b in batches:
        assert ((b["attention_mask"] == 0) <= (b["labels"] == -100)).all()  # padding never labelled
    assert len(R.sample_rows(ROWS, 50, 0)) == len(ROWS)
    pref = R.preference_batches(tokenizer, [{**r, "chosen": " No.", "rejected": r["output"]} for r in ROWS], n=4,
                                seed=1, batch_size=4)
    assert set(pref[0]) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask",
                                                                                  "labels")}
    with pytest.raises(ValueError, match="no calibration row keeps a response token"):
        R.calibration_batches(tokenizer, ROWS, n=2, max_length=8)


# --------------------------------------------------------------------------------------------- benchmark
def test_benchmark_runs_at_a_tiny_shape(capsys):
    from nlsr_lib.cli import run_benchmark

    assert run_benchmark("regions", ["--shape", "tiny"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "regions" and result["shape"] == "tiny"
    assert result["ratio_vs_forward"] > 0 and result["seconds"] > 0 and result["peak_rss_mb"] > 0
