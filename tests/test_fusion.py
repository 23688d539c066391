"""Model fusion (nlsr_lib/fusion): hand-worked operator values (spec somf.md §7, merging.md §1.3, §2), exact
thresholds, streaming = in-memory, sharded output that transformers loads, LoRA inputs, region fusion, the benchmark."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from nlsr_lib import names
from nlsr_lib.config import load_params
from nlsr_lib.counts import kept_by_density
from nlsr_lib.fusion import (
    MERGE_METHODS, CheckpointReader, LayoutError, RadixSelect, ShardedWriter, TensorMeta, apply_delta_checkpoint,
    fuse_heads, fuse_neurons, fuse_ranks, global_thresholds, head_masks, head_scores, kth_largest,
    merge_adapters, merge_checkpoints, merge_lora_deltas, merge_state_dicts, merge_task_vectors, merge_tensors,
    method_params, project, register_merge, restrict_to_mask, select_heads, tensor_seed,
)
from nlsr_lib.fusion.lora import module_weight_name
from nlsr_lib.fusion.regions import head_dim_from_config
from nlsr_lib.models import read_adapter, write_adapter

T = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b if isinstance(b, torch.Tensor) else T(b), rtol=0, atol=tol)


# --------------------------------------------------------------------------------------------- operators, by hand
def test_registry_matches_config_and_params_map():
    assert MERGE_METHODS.names() == names.MERGE_METHODS.names() == load_params("params/smoke.yaml").fusion.operators
    cfg = load_params("params/smoke.yaml").fusion
    assert method_params(cfg, "ties") == {"density": 0.2, "lam": 1.0, "disjoint": "mean"}
    assert method_params(cfg, "dare") == {"drop": 0.2, "lam": 0.3, "seed": 42}


@pytest.mark.parametrize("override,message", [
    ({"fusion.operators": ["median"]},
     r"fusion.operators\[0\]: unknown merge method 'median'; registered: weight_averaging, task_arithmetic"),
    ({"fusion.dare_drop": 1.0}, r"fusion.dare_drop: 1.0 is out of range; allowed \[0.0, 1.0\)"),
    ({"fusion.ties_scope": "row"}, "fusion.ties_scope: 'row' is not allowed; choose one of global, tensor"),
    ({"fusion.ties_density": 1.5}, "fusion.ties_density: 1.5 is out of range"),
])
def test_fusion_config_errors_name_the_key(override, message):
    from nlsr_lib.config import ParamsError

    with pytest.raises(ParamsError, match=message):
        load_params("params/smoke.yaml", override)


def test_weight_averaging_and_task_arithmetic():
    t1, t2 = T([1.0, 2.0]), T([3.0, -2.0])
    close(merge_tensors("weight_averaging", [t1, t2]), [2.0, 0.0])
    close(merge_tensors("task_arithmetic", [t1, t2], lam=0.3), [1.2, 0.0])
    close(merge_tensors("task_arithmetic", [t1, t2], lam=[1.0, 0.5]), [2.5, 1.0])
    # n = 1: the paper scales, the SOMF code returns τ unscaled (somf §6.10)
    close(merge_tensors("task_arithmetic", [t1], lam=0.3), [0.3, 0.6])
    close(merge_tensors("task_arithmetic", [t1], lam=0.3, single_task_identity=True), [1.0, 2.0])
    close(merge_tensors("weight_averaging", [t1]), [1.0, 2.0])


def test_ties_trim_elect_disjoint_by_hand():
    # density 0.5 of 4 entries keeps the top 2 magnitudes of each task vector
    t1, t2 = T([3.0, -1.0, 2.0, -4.0]), T([-2.0, 5.0, 1.0, -1.0])
    # trimmed: [3, 0, 0, -4] and [-2, 5, 0, 0]; sum [1, 5, 0, -4]; the zero sum takes the majority sign
    # sign(1 + 1 + 0 - 1) = +; agreeing entries: 3 | 5 | none | -4
    close(merge_tensors("ties", [t1, t2], density=0.5), [3.0, 5.0, 0.0, -4.0])


def test_ties_sign_election_ties_and_disjoint_modes():
    t1, t2, t3 = T([1.0, 2.0, -3.0]), T([-1.0, 4.0, 1.0]), T([0.0, -1.0, 1.0])
    # sums [0, 5, -1] -> signs [0, +, -]; majority sign(0 + 1 - 1) = 0 -> +1 (mergekit/PEFT fallback)
    close(merge_tensors("ties", [t1, t2, t3], density=1.0), [1.0, 3.0, -3.0])  # mean of {1} | {2, 4} | {-3}
    close(merge_tensors("ties", [t1, t2, t3], density=1.0, disjoint="sum", lam=0.4), [0.4, 2.4, -1.2])
    close(merge_tensors("ties", [t1.clone(), t2.clone(), t3.clone()], density=1.0, inplace=True), [1.0, 3.0, -3.0])
    # majority negative: sums [0, -3, -2] -> the zero-sum entry is elected -, only -1 agrees
    for inplace in (False, True):
        close(merge_tensors("ties", [T([1.0, -2.0, -3.0]), T([-1.0, -1.0, 1.0])], density=1.0, inplace=inplace),
              [-1.0, -1.5, -3.0])


def test_ties_magnitude_ties_are_kept_and_inputs_untouched():
    tau = T([1.0, -1.0, 1.0, 0.5])
    before = tau.clone()
    # the 2nd largest |τ| is 1 and three entries tie with it: all three are kept
    close(merge_tensors("ties", [tau], density=0.5), [1.0, -1.0, 1.0, 0.0])
    assert torch.equal(tau, before)
    close(merge_tensors("ties", [tau], density=0.0), [0.0, 0.0, 0.0, 0.0])


def test_ties_global_vs_tensor_scope():
    tv = {"a": T([4.0, 3.0]), "b": T([0.5, -1.0])}
    # global: D = 4, keep 2 -> threshold 3 over both keys; per tensor: keep 1 of each
    glob = merge_task_vectors([tv], "ties", scope="global", density=0.5)
    loc = merge_task_vectors([tv], "ties", scope="tensor", density=0.5)
    close(glob["a"], [4.0, 3.0]), close(glob["b"], [0.0, 0.0])
    close(loc["a"], [4.0, 0.0]), close(loc["b"], [0.0, -1.0])


def test_dare_rescales_kept_entries_and_is_seeded_per_key():
    tau = torch.ones(4000)
    out = merge_tensors("dare", [tau], drop=0.3, lam=1.0, seed=7, key="w")
    kept = out != 0
    close(out[kept], torch.full((int(kept.sum()),), 1 / 0.7))
    assert abs((~kept).float().mean().item() - 0.3) < 0.03
    # the drop mask is the generator's draw: u >= p, u ~ U[0, 1) from tensor_seed(seed, key, task)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(tensor_seed(7, "w", 0)))
    assert torch.equal(kept, u >= 0.3)
    assert torch.equal(out, merge_tensors("dare", [tau], drop=0.3, lam=1.0, seed=7, key="w"))
    assert not torch.equal(out, merge_tensors("dare", [tau], drop=0.3, lam=1.0, seed=7, key="v"))
    # p = 0 is task arithmetic; two tasks draw different masks
    close(merge_tensors("dare", [T([1.0, 2.0]), T([3.0, 4.0])], drop=0.0, lam=0.5), [2.0, 3.0])
    two = merge_tensors("dare", [tau, 2 * tau], drop=0.5, lam=1.0, seed=1, key="w")
    assert set(two.unique().tolist()) <= {0.0, 2.0, 4.0, 6.0} and len(two.unique()) > 2


def test_consensus_ta_and_ties_by_hand():
    t1, t2 = T([1.0, 0.0, 2.0, 0.1]), T([1.0, 3.0, -2.0, 0.0])
    # τ_MTL = [2, 3, 0, 0.1]; λ_t = 0.5: m1 = [T, F, T, T], m2 = [T, T, T, F]; counts [2, 1, 2, 1]
    close(merge_tensors("consensus_ta", [t1, t2], lam=1.0, k=2, lambda_t=0.5), [2.0, 0.0, 0.0, 0.0])
    close(merge_tensors("consensus_ta", [t1, t2], lam=0.5, k=1, lambda_t=0.5), [1.0, 1.5, 0.0, 0.05])
    close(merge_tensors("consensus_ta", [t1, t2], lam=1.0, k=0, lambda_t=0.5),
          merge_tensors("task_arithmetic", [t1, t2], lam=1.0))
    # TIES (density 1) = [1, 3, 2, 0.1]; m2 at entry 2: |−2| > 0.5·|2 − (−2)| = 2 is false (strict, as TALL)
    close(merge_tensors("consensus_ties", [t1, t2], density=1.0, lam=1.0, k=2, lambda_t=0.5, disjoint="mean"),
          [1.0, 0.0, 0.0, 0.0])
    # the default disjoint step is the TALL code's dis-sum: TIES-sum = [2, 3, ·, 0.1], entry 0 kept by both masks
    close(merge_tensors("consensus_ties", [t1, t2], density=1.0, lam=1.0, k=2, lambda_t=0.5), [2.0, 0.0, 0.0, 0.0])


def test_consensus_ties_defaults_to_the_cited_dis_sum():
    from nlsr_lib.config import FusionConfig
    from nlsr_lib.fusion.operators import method_params, param_default

    assert param_default("consensus_ties", "disjoint") == "sum"
    assert method_params(FusionConfig(), "consensus_ties")["disjoint"] == "sum"
    assert method_params(FusionConfig(), "ties")["disjoint"] == "mean"  # TIES keeps its paper's disjoint mean


def test_operator_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown merge method 'median'; registered: weight_averaging"):
        merge_tensors("median", [T([1.0])])
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['drop'\]; allowed: density, lam, disjoint"):
        merge_tensors("ties", [T([1.0])], drop=0.1)
    with pytest.raises(ValueError, match=r"q\.weight: task vector 1 has shape \(3,\) but task vector 0 has \(2,\)"):
        merge_tensors("task_arithmetic", [T([1.0, 2.0]), T([1.0, 2.0, 3.0])], key="q.weight")
    with pytest.raises(TypeError, match="float32"):
        merge_tensors("task_arithmetic", [T([1.0], dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="mean, sum"):
        merge_tensors("ties", [T([1.0])], disjoint="max")


def test_register_merge_is_one_function_plus_one_line(monkeypatch):
    # plus its name in nlsr_lib/names.py, which params choose from; a throwaway test method skips that
    monkeypatch.setattr(MERGE_METHODS, "declared", None)

    @register_merge("negate_test")
    def negate(taus, lam: float = 1.0):
        return -lam * sum(taus)

    try:
        close(merge_tensors("negate_test", [T([1.0]), T([2.0])], lam=2.0), [-6.0])
        assert MERGE_METHODS["negate_test"].params == ("lam",)
    finally:
        MERGE_METHODS.unregister("negate_test")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), density=st.sampled_from([0.1, 0.2, 0.5, 1.0]))
def test_ties_properties(seed, n, density):
    gen = torch.Generator().manual_seed(seed)
    taus = [torch.randn(7, 5, generator=gen) for _ in range(n)]
    out = merge_tensors("ties", taus, density=density)
    stacked = torch.stack(taus + [torch.zeros(7, 5)])
    # a disjoint mean of agreeing entries (or 0): between the smallest and largest input entry or 0
    assert bool((out <= stacked.max(0).values + 1e-6).all() and (out >= stacked.min(0).values - 1e-6).all())
    assert torch.equal(out, merge_tensors("ties", taus, density=density))  # deterministic
    from nlsr_lib.fusion.operators import trim

    th = taus[0].abs().median().item()
    assert torch.equal(trim(taus[0], th), taus[0] * (taus[0].abs() >= th))  # hardshrink at t⁻ is |τ| ≥ t
    # the memory-lean in-place path (the streaming engine's) computes exactly the same
    assert torch.equal(out, merge_tensors("ties", [t.clone() for t in taus], density=density, inplace=True))
    assert torch.equal(out, merge_tensors("ties", [t.clone() for t in taus], density=density, inplace=False))
    if density == 1.0 and n == 1:
        close(out, taus[0])


# --------------------------------------------------------------------------------------------- thresholds
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(1, 300), k_frac=st.floats(0.0, 1.0), dup=st.booleans())
def test_radix_select_is_exact(seed, size, k_frac, dup):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, generator=gen).abs()
    if dup:  # many exact ties and zeros
        x = (x * 4).round() / 4
    k = max(1, math.ceil(k_frac * size))
    expected = torch.sort(x, descending=True).values[k - 1].item()
    assert kth_largest(x, k) == expected
    sel = RadixSelect()
    chunks = list(x.split(37))
    for c in chunks:
        sel.add_coarse(c)
    sel.locate(k)
    for c in chunks:
        sel.add_fine(c)
    assert sel.value() == expected


def test_kept_by_density_is_exact_in_decimal():
    assert kept_by_density(100, 0.29) == 29 and kept_by_density(10, 0.2) == 2 and kept_by_density(3, 1.0) == 3
    with pytest.raises(ValueError):
        kept_by_density(10, 1.5)


def test_global_thresholds_match_concatenation():
    gen = torch.Generator().manual_seed(0)
    tv = {"a": torch.randn(50, generator=gen), "b": torch.randn(10, 7, generator=gen)}
    flat = torch.cat([t.abs().reshape(-1) for t in tv.values()])
    (t,) = global_thresholds([tv], 0.2)
    assert t == torch.sort(flat, descending=True).values[kept_by_density(120, 0.2) - 1].item()


# --------------------------------------------------------------------------------------------- checkpoints
def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=97, max_position_embeddings=32, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama base and three fine-tunes (bf16, sharded with an index) plus their state dicts in memory."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    base = LlamaForCausalLM(_tiny_config()).to(torch.bfloat16)
    base.save_pretrained(root / "base", max_shard_size="40KB")
    states = [base.state_dict()]
    dirs = []
    for i in range(3):
        gen = torch.Generator().manual_seed(100 + i)
        state = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype)
                 for k, v in base.state_dict().items()}
        model = LlamaForCausalLM(_tiny_config()).to(torch.bfloat16)
        model.load_state_dict(state)
        model.save_pretrained(root / f"m{i}", max_shard_size="40KB")
        dirs.append(root / f"m{i}")
        states.append({k: v.clone() for k, v in state.items()})
    assert (root / "base" / "model.safetensors.index.json").is_file()
    return root, dirs, {k: v.clone() for k, v in states[0].items()}, states[1:]


def test_reader_reads_what_safe_open_reads(checkpoints):
    root, _, _, _ = checkpoints
    index = json.loads((root / "base" / "model.safetensors.index.json").read_text())
    with CheckpointReader(root / "base") as reader:
        assert set(reader.keys()) == set(index["weight_map"])
        for name, file in list(index["weight_map"].items())[:6]:
            with safe_open(root / "base" / file, framework="pt") as f:
                assert torch.equal(reader.read(name), f.get_tensor(name))


@pytest.mark.parametrize("method,params,scope", [
    ("weight_averaging", {}, "tensor"),
    ("task_arithmetic", {"lam": 0.4}, "tensor"),
    ("ties", {"density": 0.2}, "tensor"),
    ("ties", {"density": 0.2, "disjoint": "sum", "lam": 0.4}, "global"),
    ("dare", {"drop": 0.3, "seed": 3}, "tensor"),
    ("consensus_ta", {"k": 2, "lambda_t": 0.6}, "tensor"),
    ("consensus_ties", {"density": 0.3}, "global"),
])
def test_streaming_equals_in_memory(checkpoints, tmp_path, method, params, scope):
    _, dirs, base, models = checkpoints
    out = merge_checkpoints(dirs[0].parent / "base", dirs, tmp_path / "out", method, scope=scope,
                            max_shard_size=30_000, **params)
    expected = merge_state_dicts(base, models, method, scope=scope, **params)
    with CheckpointReader(out) as reader:
        assert set(reader.keys()) == set(expected)
        for k, v in expected.items():
            got = reader.read(k)
            assert got.dtype == torch.bfloat16 and torch.equal(got, v), k


def test_sharded_output_loads_with_transformers(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    root, dirs, base, models = checkpoints
    (root / "base" / "tokenizer_config.json").write_text("{}")
    out = merge_checkpoints(root / "base", dirs, tmp_path / "merged", "ties", density=0.5, max_shard_size=30_000,
                            device="cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in base.values())
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "nlsr_merge.json").read_text())["method"] == "ties"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    expected = merge_state_dicts(base, models, "ties", density=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left behind


def test_dry_run_reports_bytes_and_memory(checkpoints, tmp_path, capsys):
    root, dirs, base, _ = checkpoints
    size = sum(v.numel() * 2 for v in base.values())
    plan = merge_checkpoints(root / "base", dirs, tmp_path / "x", "ties", scope="global", dry_run=True)
    text = capsys.readouterr().out
    assert "read" in text and "peak memory" in text and "3 passes" in text
    assert plan.bytes_written == size and plan.passes == 3 and plan.peak_bytes > 0
    float_bytes = sum(v.numel() * 2 for v in base.values() if v.is_floating_point())
    assert plan.bytes_read == size + 3 * float_bytes + 2 * 4 * float_bytes
    assert not (tmp_path / "x").exists()


def test_determinism_by_seed(checkpoints, tmp_path):
    root, dirs, _, _ = checkpoints
    outs = [merge_checkpoints(root / "base", dirs, tmp_path / f"d{i}", "dare", seed=s, drop=0.5, prefetch=bool(i))
            for i, s in enumerate((5, 5, 6))]
    a, b, c = (load_file(o / "model.safetensors") if (o / "model.safetensors").exists() else None for o in outs)
    assert a is not None and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _write_ckpt(path, state):
    w = ShardedWriter(path, [TensorMeta(k, tuple(v.shape), v.dtype) for k, v in state.items()], 1 << 30)
    for k, v in state.items():
        w.write(k, v)
    w.close()


def test_clear_errors_for_keys_shapes_dtypes(tmp_path):
    base = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    _write_ckpt(tmp_path / "base", base)
    _write_ckpt(tmp_path / "keys", {"a.weight": torch.zeros(2, 3), "c.weight": torch.zeros(4)})
    _write_ckpt(tmp_path / "shape", {"a.weight": torch.zeros(3, 2), "b.weight": torch.zeros(4)})
    _write_ckpt(tmp_path / "dtype", {"a.weight": torch.zeros(2, 3, dtype=torch.bfloat16), "b.weight": torch.zeros(4)})
    with pytest.raises(LayoutError, match=r"lacks 1 key\(s\) of base .*: b\.weight; .* 1 key\(s\) not in .*c\.weight"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "keys"], tmp_path / "o", "task_arithmetic")
    with pytest.raises(LayoutError, match=r"tensor a\.weight: shape \(2, 3\) in base .* but \(3, 2\) in model"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "shape"], tmp_path / "o", "task_arithmetic")
    with pytest.raises(LayoutError, match=r"tensor a\.weight: dtype torch\.float32 in base .* but torch\.bfloat16"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "dtype"], tmp_path / "o", "task_arithmetic")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "nothing"], tmp_path / "o", "task_arithmetic")
    _write_ckpt(tmp_path / "ok", base)
    merge_checkpoints(tmp_path / "base", [tmp_path / "ok"], tmp_path / "o", "task_arithmetic")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "ok"], tmp_path / "o", "task_arithmetic")


def test_nan_weights_and_unknown_parameters_are_refused_before_writing(tmp_path):
    _write_ckpt(tmp_path / "base", {"w": torch.ones(3)})
    _write_ckpt(tmp_path / "nan", {"w": T([1.0, float("nan"), 1.0])})
    with pytest.raises(ValueError, match=r"tensor w: NaN or inf in task vector 0"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "nan"], tmp_path / "o", "ties")
    with pytest.raises(ValueError, match=r"ties: unknown parameter\(s\) \['drop'\]"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "base"], tmp_path / "o", "ties", drop=0.1)
    with pytest.raises(ValueError, match="NaN or inf in the base or in model 0"):
        merge_state_dicts({"w": torch.ones(3)}, [{"w": T([1.0, float("inf"), 1.0])}], "ties")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "nan"]  # nothing half-written left


def test_non_float_tensors_pass_through(tmp_path):
    base = {"w": torch.ones(3), "ids": T([1, 2, 3])}
    _write_ckpt(tmp_path / "base", base)
    _write_ckpt(tmp_path / "m", {"w": torch.full((3,), 3.0), "ids": T([1, 2, 3])})
    out = merge_checkpoints(tmp_path / "base", [tmp_path / "m"], tmp_path / "o", "task_arithmetic", lam=0.5)
    got = load_file(out / "model.safetensors")
    close(got["w"], [2.0, 2.0, 2.0])
    assert torch.equal(got["ids"], base["ids"])


# --------------------------------------------------------------------------------------------- LoRA inputs
PFX = "base_model.model.model.layers.0.self_attn."


def _adapter(gen, r=2, d=8, scale=1.0, modules=("q_proj", "v_proj")):
    state = {}
    for m in modules:
        state[f"{PFX}{m}.lora_A.weight"] = scale * torch.randn(r, d, generator=gen)
        state[f"{PFX}{m}.lora_B.weight"] = scale * torch.randn(d, r, generator=gen)
    return state


def test_factor_space_merge_of_adapters(tmp_path):
    gen = torch.Generator().manual_seed(0)
    cfg = {"r": 2, "lora_alpha": 4, "peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]}
    aligned = _adapter(gen)
    tasks = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in aligned.items()} for _ in range(2)]
    write_adapter(tmp_path / "al", aligned, cfg)
    (tmp_path / "al" / "tokenizer.json").write_text("{}")
    (tmp_path / "al" / "README.md").write_text("model card")
    for i, t in enumerate(tasks):
        write_adapter(tmp_path / f"t{i}", t, cfg)
    out = merge_adapters(tmp_path / "al", [tmp_path / "t0", tmp_path / "t1"], tmp_path / "out", "task_arithmetic",
                         lam=0.5)
    merged, merged_cfg = read_adapter(out)
    assert merged_cfg == cfg
    assert (out / "tokenizer.json").is_file() and not (out / "README.md").exists()  # tokenizer files only
    for k in aligned:  # θ_aligned + 0.5 (τ_1 + τ_2) = θ_aligned + 0.5 Σ(θ_t − θ_aligned)
        close(merged[k], aligned[k] + 0.5 * ((tasks[0][k] - aligned[k]) + (tasks[1][k] - aligned[k])), 1e-5)
    write_adapter(tmp_path / "r4", _adapter(gen, r=4), {**cfg, "r": 4})
    with pytest.raises(LayoutError, match="r = 4 but"):
        merge_adapters(tmp_path / "al", [tmp_path / "r4"], tmp_path / "bad", "ties")


def test_lora_dense_deltas_delta_file_and_model(tmp_path, checkpoints):
    root, _, base, _ = checkpoints
    gen = torch.Generator().manual_seed(1)
    d = 32
    cfg = {"r": 2, "lora_alpha": 4, "peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]}
    # v_proj of the tiny Llama is 16 × 32 (2 kv heads × head_dim 8)
    ads = []
    for i in range(2):
        st_ = {f"{PFX}q_proj.lora_A.weight": torch.randn(2, d, generator=gen),
               f"{PFX}q_proj.lora_B.weight": torch.randn(d, 2, generator=gen),
               f"{PFX}v_proj.lora_A.weight": torch.randn(2, d, generator=gen),
               f"{PFX}v_proj.lora_B.weight": torch.randn(16, 2, generator=gen)}
        write_adapter(tmp_path / f"a{i}", st_, {**cfg, "r": 2, "lora_alpha": 4 * (i + 1)})
        ads.append((st_, 2.0 * (i + 1)))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert module_weight_name(f"{PFX}q_proj.lora_A.weight") == q
    dense = [k * (s[f"{PFX}q_proj.lora_B.weight"] @ s[f"{PFX}q_proj.lora_A.weight"]) for s, k in ads]
    out = merge_lora_deltas([tmp_path / "a0", tmp_path / "a1"], tmp_path / "delta", "task_arithmetic", lam=0.5)
    got = load_file(out / "model.safetensors")
    assert set(got) == {q, "model.layers.0.self_attn.v_proj.weight"} and got[q].dtype == torch.float32
    close(got[q], 0.5 * (dense[0] + dense[1]), 1e-5)
    # applied onto W_sft: a full checkpoint, other tensors unchanged, equal to applying the delta file later
    full = merge_lora_deltas([tmp_path / "a0", tmp_path / "a1"], tmp_path / "full", "task_arithmetic", lam=0.5,
                             base_dir=root / "base")
    later = apply_delta_checkpoint(root / "base", out, tmp_path / "later")
    with CheckpointReader(full) as f, CheckpointReader(later) as g:
        close(f.read(q).float(), (base[q].float() + 0.5 * (dense[0] + dense[1])).to(torch.bfloat16).float())
        assert torch.equal(f.read("model.norm.weight"), base["model.norm.weight"])
        assert all(torch.equal(f.read(k), g.read(k)) for k in f.keys())
    # relative to a reference adapter: τ_i = D_i − D_ref, output D_ref + Δ
    rel = merge_lora_deltas([tmp_path / "a1"], tmp_path / "rel", "task_arithmetic", lam=0.5, reference=tmp_path / "a0")
    close(load_file(rel / "model.safetensors")[q], dense[0] + 0.5 * (dense[1] - dense[0]), 1e-5)
    write_adapter(tmp_path / "bad", {f"{PFX}q_proj.lora_A.weight": torch.randn(2, 5),
                                     f"{PFX}q_proj.lora_B.weight": torch.randn(d, 2)}, cfg)
    with pytest.raises(LayoutError, match=r"q_proj\.weight: base weight \(32, 32\) but the adapters' delta is \(32, 5"):
        merge_lora_deltas([tmp_path / "bad"], tmp_path / "x", "task_arithmetic", base_dir=root / "base")


# --------------------------------------------------------------------------------------------- regions
def _region_inputs(seed=0, modules=("q_proj", "k_proj", "v_proj", "o_proj")):
    gen = torch.Generator().manual_seed(seed)
    aligned = _adapter(gen, r=2, d=8, modules=modules)
    tasks = [{k: v + torch.randn(v.shape, generator=gen) for k, v in aligned.items()} for _ in range(2)]
    return aligned, tasks


def test_neuron_level_inside_outside():
    aligned, tasks = _region_inputs()
    plain = merge_state_dicts(aligned, tasks, "ties", density=0.5)
    none = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in aligned.items()}
    every = {k: torch.ones_like(v, dtype=torch.bool) for k, v in aligned.items()}
    assert all(torch.equal(v, aligned[k]) for k, v in fuse_neurons(aligned, tasks, none, "ties", density=0.5).items())
    assert all(torch.equal(v, plain[k]) for k, v in fuse_neurons(aligned, tasks, every, "ties", density=0.5).items())
    gen = torch.Generator().manual_seed(3)
    mask = {k: torch.rand(v.shape, generator=gen) < 0.3 for k, v in aligned.items()}
    inside = fuse_neurons(aligned, tasks, mask, "ties", density=0.5, where="inside")
    outside = fuse_neurons(aligned, tasks, mask, "ties", density=0.5, where="outside")
    for k, m in mask.items():
        assert torch.equal(inside[k][~m], aligned[k][~m]) and torch.equal(inside[k][m], plain[k][m])
        assert torch.equal(outside[k][m], aligned[k][m]) and torch.equal(outside[k][~m], plain[k][~m])
    k0 = next(iter(aligned))
    with pytest.raises(LayoutError, match=rf"mask {k0}: shape \(1,\) but the adapter tensor is \(2, 8\)"):
        restrict_to_mask(aligned, {k0: torch.zeros(1, dtype=torch.bool)})


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), q=st.integers(0, 6), side=st.sampled_from(["left", "right"]))
def test_projections_onto_and_out_sum_to_the_update(seed, q, side):
    gen = torch.Generator().manual_seed(seed)
    delta = {"k.lora_B.weight": torch.randn(6, 6, generator=gen)}
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    bases = {"k.lora_B.weight": u[:, :q]}
    onto, out = project(delta, bases, "onto", side), project(delta, bases, "out", side)
    close(onto["k.lora_B.weight"] + out["k.lora_B.weight"], delta["k.lora_B.weight"], 1e-5)
    # the "out" part has no component in the subspace
    residual = u[:, :q].T @ out["k.lora_B.weight"] if side == "left" else out["k.lora_B.weight"] @ u[:, :q]
    assert residual.abs().max().item() < 1e-5 if q else True


def test_rank_level_fusion_and_bad_basis():
    aligned, tasks = _region_inputs(modules=("q_proj",))
    key = f"{PFX}q_proj.lora_B.weight"
    u = torch.eye(8)[:, :3]  # the first three output rows span the safety subspace
    fused = fuse_ranks(aligned, tasks, {key: u}, "task_arithmetic", mode="out", lam=1.0)
    close(fused[key][:3], aligned[key][:3])  # the safety rows are untouched
    plain = merge_state_dicts(aligned, tasks, "task_arithmetic", lam=1.0)
    close(fused[key][3:], plain[key][3:], 1e-6)
    with pytest.raises(ValueError, match="not orthonormal"):
        project({key: aligned[key]}, {key: 2 * u})
    with pytest.raises(LayoutError, match=r"shape \(5, 3\) but the projected dimension is 8"):
        project({key: aligned[key]}, {key: torch.zeros(5, 3)})


def test_head_level_aggregation_selection_and_all_heads_is_plain():
    aligned, tasks = _region_inputs()  # d = 8, head_dim 4 -> 2 heads per module
    scores = {k: torch.zeros_like(v) for k, v in aligned.items()}
    scores[f"{PFX}q_proj.lora_B.weight"][4:8] = 1.0  # head 1 of q_proj
    scores[f"{PFX}o_proj.lora_A.weight"][:, 0:4] = 0.5  # head 0 of o_proj
    hs = head_scores(scores, head_dim=4)
    q, o = PFX + "q_proj", PFX + "o_proj"
    assert hs[(q, 1)] == 1.0 and hs[(o, 0)] == 0.5 and hs[(q, 0)] == 0.0 and len(hs) == 8
    assert select_heads(hs, 0.25) == {(q, 1), (o, 0)}
    masks = head_masks({k: v.shape for k, v in aligned.items()}, {(q, 1)}, 4)
    assert masks[f"{PFX}q_proj.lora_B.weight"][4:].all() and not masks[f"{PFX}q_proj.lora_B.weight"][:4].any()
    assert masks[f"{PFX}q_proj.lora_A.weight"].all()  # shared by the module's heads
    assert not masks[f"{PFX}k_proj.lora_A.weight"].any()
    plain = merge_state_dicts(aligned, tasks, "ties", density=0.5)
    every = fuse_heads(aligned, tasks, scores, "ties", head_dim=4, fraction=1.0, where="inside", density=0.5)
    assert all(torch.equal(every[k], plain[k]) for k in aligned)
    protected = fuse_heads(aligned, tasks, scores, "ties", head_dim=4, fraction=0.25, where="outside", density=0.5)
    assert torch.equal(protected[f"{PFX}q_proj.lora_B.weight"][4:], aligned[f"{PFX}q_proj.lora_B.weight"][4:])
    assert torch.equal(protected[f"{PFX}q_proj.lora_B.weight"][:4], plain[f"{PFX}q_proj.lora_B.weight"][:4])
    with pytest.raises(LayoutError, match="not a multiple of head_dim 3"):
        head_scores(scores, head_dim=3)
    assert head_dim_from_config(_tiny_config().to_dict()) == 8 and head_dim_from_config({"head_dim": 64}) == 64


# --------------------------------------------------------------------------------------------- benchmark
def test_benchmark_core_at_a_tiny_shape(capsys, tmp_path):
    from nlsr_lib.paths import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("bench_merge", PROJECT_ROOT / "benchmarks" / "merge.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--shape", "tiny", "--models", "2", "--no-mergekit", "--workdir", str(tmp_path / "w")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "merge" and result["ratio_vs_mergekit"] is None
    assert result["seconds"] > 0 and result["peak_rss_mb"] > 0 and result["mergekit_peak_rss_mb"] is None
