"""Stages of notebooks 02/03 on the smoke profile: mixtures, the attack continues the aligned adapter,
task accuracy records, EXPO adapters built from adapter files."""

from __future__ import annotations

import json

import pytest
import torch

from nlsr_lib.stages import align, attack, evaluate, expo, world
from nlsr_lib.config import load_params
from nlsr_lib.models import read_adapter
from nlsr_lib.runs import Run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NLSR_HOME", str(tmp_path_factory.mktemp("home")))
    params = load_params("params/smoke.yaml", {"attack.train.learning_rate": 1e-2})
    yield params, Run(params.profile, quiet=True)
    mp.undo()


def test_mixture_stage_counts(smoke):
    params, run = smoke
    art = attack.mixture_stage(params, run, "sst2", 0.1)
    records = json.loads((art.path / "mixture.json").read_text())
    assert len(records) == params.attack.n and art.manifest()["summary"]["unsafe"] == 4
    # the safety_mixing defence (spec/defences.md §6, replace, g = 0.1): safe rows replace benign ones
    mixed = attack.mixture_stage(params, run, "sst2", 0.1, variant="safety_mixing")
    vl = mixed.manifest()["summary"]
    assert (vl["unsafe"], vl["safe"], vl["finetune"]) == (4, 4, params.attack.n - 8)
    harmful = {r["output"] for r in records if r["flag"] == "unsafe"}
    assert harmful == {r["output"] for r in json.loads((mixed.path / "mixture.json").read_text()) if r["flag"] == "unsafe"}
    with pytest.raises(ValueError, match="poisoned, clean, safety_mixing"):
        attack.mixture_stage(params, run, "sst2", 0.1, variant="mixed")


def test_attack_trains_the_aligned_adapter_further(smoke):
    params, run = smoke
    ref = attack.attack_stage(params, run, "dpo", "sst2", 0.1)
    aligned, _ = read_adapter(align.align_stage(params, run, "dpo").path / "adapter")
    attacked, _ = read_adapter(ref.adapter)
    assert sorted(aligned) == sorted(attacked)  # one LoRA parameter space (spec §1.1)
    assert any(not torch.equal(aligned[k], attacked[k]) for k in aligned)
    assert ref.base == str(align.align_stage(params, run, "sft").path / "merged")
    summary = evaluate.task_accuracy_stage(params, run, ref, "sst2").manifest()["summary"]
    assert set(summary) == {"accuracy", "accuracy_strict", "n"} and summary["n"] == params.attack.task_eval_size
    assert summary["accuracy_strict"] <= summary["accuracy"]


def test_unaligned_baseline_is_a_fresh_lora_on_the_base(smoke):
    params, run = smoke
    ref = attack.attack_stage(params, run, "unaligned", "sst2", 0.1)
    assert ref.base == str(world.base_model_stage(params, run).path)
    state, config = read_adapter(ref.adapter)
    assert config["r"] == params.lora.r and state


def test_expo_stage_scales_the_aligned_adapter(smoke):
    params, run = smoke
    aligned, _ = read_adapter(evaluate.aligned_adapter_ref(params, run, "kto").adapter)
    extrapolated, _ = read_adapter(expo.expo_stage(params, run, "kto", 0.5).adapter)
    for key, tensor in aligned.items():
        torch.testing.assert_close(extrapolated[key], tensor * (1.5 if ".lora_B." in key else 1.0))
    identity, _ = read_adapter(expo.expo_stage(params, run, "kto", 0.0).adapter)
    assert all(torch.equal(identity[k], aligned[k]) for k in aligned)
