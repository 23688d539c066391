"""One Registry type for every family, its one error wording, the declared names params are validated against, the
one home of the counts and of LoRA key parsing."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nlsr_lib import names
from nlsr_lib.counts import floor_share, kept_by_density, kept_by_sparsity
from nlsr_lib.errors import NlsrError
from nlsr_lib.registry import Names, Registry, UnknownName


# --------------------------------------------------------------------------------------------- Registry
def test_a_registry_is_a_mapping_in_registration_order():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    assert b() == "b"  # the decorator returns the function unchanged
    assert reg.register("a", len) is len  # a plain call
    assert list(reg) == ["b", "a"] and reg.names() == ("b", "a") and len(reg) == 2
    assert "a" in reg and "c" not in reg and reg["a"] is len and reg.get("c") is None
    assert reg.unregister("b") is b and reg.names() == ("a",)


def test_make_builds_the_entry_from_the_function_and_its_metadata():
    reg = Registry("widget", make=lambda name, fn, **meta: (name, fn, meta))
    reg.register("x", len, size=3)
    assert reg["x"] == ("x", len, {"size": 3})
    with pytest.raises(TypeError, match="takes no"):
        Registry("widget").register("y", len, size=3)


def test_the_one_lookup_error():
    reg = Registry("merge method")
    reg.register("ties", len)
    reg.register("dare", len)
    with pytest.raises(UnknownName) as info:
        reg["tie"]
    assert str(info.value) == "unknown merge method 'tie'; registered: ties, dare"
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert isinstance(info.value, NlsrError)  # the CLI prints it as one line, exit 2


def test_duplicate_and_undeclared_names_are_refused():
    reg = Registry(Names("widget", "a", "b"))
    reg.register("a", len)
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a", len)
    with pytest.raises(ValueError, match=r"widget 'z' is not declared in nlsr_lib/names.py \(declared: a, b\)"):
        reg.register("z", len)
    assert reg.kind == "widget"


FAMILIES = [  # (declared names, module, registry)
    (names.ALIGNMENT_METHODS, "nlsr_lib.train.alignment", "ALIGNMENT_METHODS"),
    (names.REGION_SCORERS, "nlsr_lib.regions.registry", "SCORERS"),
    (names.MERGE_METHODS, "nlsr_lib.fusion.operators", "MERGE_METHODS"),
    (names.DEFENCES, "nlsr_lib.restore.defences", "DEFENCES"),
    (names.RESTORE_STRATEGIES, "nlsr_lib.restore.selection", "STRATEGIES"),
    (names.SIMILARITIES, "nlsr_lib.restore.similarity", "SIMILARITIES"),
    (names.CORRECTIONS, "nlsr_lib.restore.correction", "CORRECTIONS"),
    (names.JUDGES, "nlsr_lib.evaluate.judges", "JUDGES"),
    (names.BENCHMARKS, "nlsr_lib.evaluate.benchmarks", "BENCHMARKS"),
    (names.WRAPPERS, "nlsr_lib.evaluate.wrappers", "WRAPPERS"),
    (names.KEYWORD_LISTS, "nlsr_lib.evaluate.keywords", "KEYWORD_LISTS"),
    (names.LLM_PROTOCOLS, "nlsr_lib.evaluate.llm_judges", "PROTOCOLS"),
    (names.FIELD_DEFENCES, "nlsr_lib.stages.field_defences", "FIELD_DEFENCES"),
]


@pytest.mark.parametrize("declared, module, attr", FAMILIES, ids=[f[2] for f in FAMILIES])
def test_every_declared_name_is_registered_in_order(declared, module, attr):
    registry = getattr(importlib.import_module(module), attr)
    assert registry.declared is declared and registry.kind == declared.kind
    assert registry.names() == declared.names()


def test_every_family_is_a_registry():
    from nlsr_lib.data import tasks
    from nlsr_lib.evaluate import accuracy
    from nlsr_lib.stages import STAGES, ablation, executors, notebooks
    from nlsr_lib.stages import fusion as model_fusion

    for reg in (STAGES, ablation.ABLATIONS, accuracy.MATCHERS, model_fusion.FUSIONS, tasks.TASKS,
                notebooks.NOTEBOOK_STAGES, executors.EXECUTORS):
        assert isinstance(reg, Registry)
    assert accuracy.MATCHERS.names() == tasks.TASKS.names()


def test_config_imports_no_heavy_module():
    code = ("import sys, nlsr_lib.config; heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------- counts
def test_counts_hand_values():
    assert kept_by_sparsity(100, 0.57) == 43  # float 100·0.57 = 56.999…
    assert kept_by_sparsity(10, 0.7) == 3 and kept_by_sparsity(4096, 0.8) == 820 and kept_by_sparsity(128, 0.8) == 26
    assert kept_by_sparsity(5, 0.0) == 5
    assert kept_by_density(100, 0.29) == 29 and kept_by_density(10, 0.2) == 2 and kept_by_density(3, 1.0) == 3
    assert kept_by_density(100, 0.57) == 57 and floor_share(100, 0.57) == 57
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        kept_by_sparsity(5, 1.0)
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\], got 1.5"):
        kept_by_density(10, 1.5)


@given(n=st.integers(0, 10**6), hundredths=st.integers(0, 99))
def test_kept_by_sparsity_is_the_ceiling_and_density_the_floor(n, hundredths):
    """Exact in decimal: with x = k/100, ⌈(1−x)·n⌉ and ⌊x·n⌋ in integer arithmetic."""
    x = hundredths / 100
    assert kept_by_sparsity(n, x) == -((-(100 - hundredths) * n) // 100)
    assert kept_by_density(n, x) == hundredths * n // 100
    assert kept_by_sparsity(n, x) + floor_share(n, x) == n


# --------------------------------------------------------------------------------------------- LoRA keys
def test_lora_key_parsing_has_one_home():
    from nlsr_lib.fusion.lora import module_weight_name
    from nlsr_lib.regions.lora import normalize_key, parse_key, split_key
    from nlsr_lib.restore.modules import canonical_mask_key

    key = "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"
    module = "base_model.model.model.layers.3.self_attn.q_proj"
    assert split_key(key) == (module, "B")
    for other in (f"{module}.lora_B.default.weight", f"{module}.lora_B.default"):
        assert split_key(other) is None and normalize_key(other) == key and canonical_mask_key(other) == key
    assert split_key("model.embed_tokens.weight") is None
    assert canonical_mask_key("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert parse_key(key) == {"layer": 3, "module": "q_proj", "matrix": "B"}
    assert module_weight_name(key) == "model.layers.3.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="neither a lora_A nor a lora_B weight"):
        module_weight_name("model.embed_tokens.weight")
