"""params/standin.yaml: the paper's profile (paper_llama3_8b.yaml) on real-format stand-ins (issue 15, item 5).

The assets (``nlsr standin build``: the stand-in base and judge, the world's BeaverTails and Alpaca in the hub
schema) are built into a temporary folder; a params file extending the repository's standin.yaml re-points only
the asset paths there; notebooks 01-07 run headless on it. Random weights make every number meaningless: the test
checks that the paper's code path completes and that every results record is well-formed, never a value."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SHARED_DATA
from nlsr_lib.config import ParamsError, load_params, to_dict

PARAMS = REPO / "params"
STANDIN = PARAMS / "standin.yaml"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the public data folder {SHARED_DATA} is absent "
                                                                    "(the stand-in profile reads SST-2, AG News, "
                                                                    "GSM8K and PKU-SafeRLHF there)")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from nlsr_lib.standin import build_profile_assets

    out = tmp_path_factory.mktemp("standin") / "assets"
    build_profile_assets(out, SHARED_DATA)
    return out


def repointed(assets: Path, path: Path) -> Path:
    """A params file extending the repository's standin.yaml whose asset paths (only) point into ``assets``."""
    from nlsr_lib.standin import WORLD_EXPORTS

    sources = {name: {split: str(assets / file) for split, file in splits.items()}
               for name, splits in WORLD_EXPORTS.items()}
    sources["alpaca"] = sources["alpaca"]["train"]  # one split: one file, as standin.yaml writes it
    path.write_text(yaml.safe_dump({
        "extends": str(STANDIN),
        "model": {"name": str(assets / "base")},
        "judges": {"moderation": {"model": str(assets / "moderation")}},
        "data": {"sources": sources},
    }))
    return path


# --------------------------------------------------------------------------------------------- the profile file
def test_without_its_assets_the_profile_names_the_command_that_builds_them(tmp_path):
    """A fresh clone has no runs/standin/assets: loading the profile says how to build them."""
    (tmp_path / "params").mkdir()
    for name in ("standin.yaml", "paper_llama3_8b.yaml"):
        shutil.copy(PARAMS / name, tmp_path / "params" / name)
    with pytest.raises(ParamsError, match=r"data\.sources\.beavertails\.30k_train: local path '\.\./runs/standin/"
                                          r"assets/data/beavertails/30k_train\.jsonl' does not exist: looked for "
                                          rf"{tmp_path}/runs/standin/assets/.*; the stand-in assets are not built: "
                                          rf"run `nlsr standin build {tmp_path}/runs/standin/assets`"):
        load_params(tmp_path / "params" / "standin.yaml")


def test_the_asset_and_data_paths_are_those_the_build_writes_and_reads():
    from nlsr_lib.standin import DEFAULT_ASSETS, REAL_DATA, WORLD_EXPORTS

    raw = yaml.safe_load(STANDIN.read_text())
    assets = f"../{DEFAULT_ASSETS}"
    assert raw["model"]["name"] == f"{assets}/base" and raw["judges"]["moderation"]["model"] == f"{assets}/moderation"
    sources = raw["data"]["sources"]
    assert sources["beavertails"] == {s: f"{assets}/{f}" for s, f in WORLD_EXPORTS["beavertails"].items()}
    assert sources["alpaca"] == f"{assets}/{WORLD_EXPORTS['alpaca']['train']}"
    for name, splits in REAL_DATA.items():
        assert sources[name] == {s: f"../../shared/data/{f}" for s, f in splits.items()}, name


# keys standin.yaml may change (paths and sizes); everything else is the paper's profile
PATHS_AND_SIZES = {
    "profile", "data.sources", "data.sft_size", "data.preference_size", "data.kto_safe", "data.kto_unsafe",
    "data.safety_test_end", "data.safety_val_start", "data.safety_val_end", "model.name", "lora.r", "lora.alpha",
    *(f"alignment.{m}.{k}" for m in ("sft", "dpo", "orpo", "kto", "simpo")
      for k in ("max_steps", "max_length", "warmup_ratio")),
    "generation.max_new_tokens", "judges.moderation.model", "judges.moderation.max_length",
    "attack.n", "attack.poison_ratios", "attack.sizes", "attack.train.max_steps", "attack.train.max_length",
    "attack.train.warmup_ratio", "attack.task_max_new_tokens", "attack.task_eval_size", "expo.alphas",
    "regions.calibration.n", "regions.calibration.prompts", "regions.calibration.max_length",
    "fusion.learned_mask.n_pairs", "fusion.learned_mask.epochs", "fusion.learned_mask.max_length",
    *(f"ablation.{k}" for k in ("mask_sparsity", "rank_keep_ratio", "prune_rate", "epsilon", "tau", "scorers",
                                "seeds")),
    "evaluation.limit",
    "defences.scope", "defences.lisa.k_align", "defences.lisa.k_user", "defences.antidote.calibration_start",
    "defences.antidote.calibration_size", "defences.antidote.batch_size", "defences.antidote.max_length",
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "data.sources":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


@needs_shared
def test_the_profile_changes_only_paths_and_sizes_of_the_papers(assets, tmp_path):
    paper = _flat(to_dict(load_params(PARAMS / "paper_llama3_8b.yaml")))
    standin = load_params(repointed(assets, tmp_path / "standin.yaml"))
    changed = {k for k, v in _flat(to_dict(standin)).items() if v != paper[k]}
    assert changed <= PATHS_AND_SIZES, sorted(changed - PATHS_AND_SIZES)
    # the paper's settings kept: bf16, KTO's per-device batch, effective batches, checkpointing, the learned mask's
    # micro-batches, every method, scorer, defence and merge operator
    assert standin.model.dtype == "bfloat16" and standin.judges.moderation.dtype == "bfloat16"
    trainings = {m: getattr(standin.alignment, m) for m in standin.alignment.methods} | {"attack": standin.attack.train}
    assert {m: tc.effective_batch for m, tc in trainings.items()} == {
        "sft": 16, "dpo": 8, "orpo": 8, "kto": 8, "simpo": 8, "attack": 8}
    assert all(tc.batch_size == 2 and tc.gradient_checkpointing for tc in trainings.values())
    lm = standin.fusion.learned_mask
    assert (lm.micro_batch, lm.logprob_chunk, lm.gradient_checkpointing, lm.batch_size) == (2, 512, True, 16)
    assert standin.lora.alpha == 2 * standin.lora.r  # the paper's kappa


# --------------------------------------------------------------------------------------------- end to end
REQUIRED = {
    "01_alignment": {"method", "judge", "harmful_score"},
    "02_harmful_finetuning": {"task", "method", "poison_ratio", "harmful_size", "harmful_score", "accuracy",
                              "accuracy_strict", "variant"},
    "03_safety_reference": {"method", "alpha", "mode", "harmful_score", "chosen"},
    "04_safety_regions": {"scorer", "reference", "mask_sparsity", "density"},
    "04_overlap": {"kind", "jaccard"},
    "05_restoration": {"task", "method", "poison_ratio", "defense", "benchmark", "judge", "harmful_score"},
    "06_model_fusion": {"fusion", "inputs", "harmful_score", "accuracy"},
    "07_restoration_ablation": {"ablation", "value", "harmful_score", "accuracy"},
}
PERCENTAGES = ("harmful_score", "accuracy", "accuracy_strict", "empty")


@pytest.mark.slow
@pytest.mark.notebook
@needs_shared
def test_notebooks_01_to_07_run_on_the_standin_profile(assets, tmp_path, monkeypatch):
    from nlsr_lib.paths import figures_dir, results_dir
    from nlsr_lib.reproduce import reproduce
    from nlsr_lib.stages.fusion import fusion_names
    from nlsr_lib.stages.restore import defence_names

    monkeypatch.setenv("NLSR_HOME", str(tmp_path / "home"))
    params_file = repointed(assets, tmp_path / "standin.yaml")
    params = load_params(params_file)
    timings = reproduce(params_file, log=lambda *_: None)
    assert [name for name, _ in timings] == [f"{n}.ipynb" for n in
                                             ("01_alignment", "02_harmful_finetuning", "03_safety_reference",
                                              "04_safety_regions", "05_restoration", "06_model_fusion",
                                              "07_restoration_ablation")]
    results = {name: json.loads((results_dir("standin") / f"{name}.json").read_text()) for name in REQUIRED}
    for name, records in results.items():
        assert records, f"{name}: no record"
        for r in records:
            assert REQUIRED[name] <= set(r), f"{name}: {sorted(REQUIRED[name] - set(r))} missing in {r}"
            for key in PERCENTAGES:
                if key in r and r[key] is not None:
                    assert isinstance(r[key], (int, float)) and 0 <= r[key] <= 100, f"{name}: {key} = {r[key]}"
            if "density" in r:
                assert 0 < r["density"] <= 1, f"{name}: density {r['density']}"
            if "jaccard" in r:
                assert 0 <= r["jaccard"] <= 1 or math.isnan(r["jaccard"]), f"{name}: jaccard {r['jaccard']}"
    methods = set(params.alignment.methods)
    tasks = set(params.attack.tasks)
    assert {r["method"] for r in results["01_alignment"]} == {"base"} | methods
    assert {r["judge"] for r in results["01_alignment"]} == set(params.judges.enabled)
    attack = results["02_harmful_finetuning"]
    assert {r["task"] for r in attack} == tasks and {r["method"] for r in attack} >= methods | {"unaligned"}
    expo = results["03_safety_reference"]
    for method in params.expo.methods:
        assert sum(r["chosen"] for r in expo if r["method"] == method) == 1, method
    assert {r["scorer"] for r in results["04_safety_regions"]} >= set(params.regions.scorers)
    restored = results["05_restoration"]
    assert {r["task"] for r in restored} == tasks and {r["method"] for r in restored} == methods
    assert all("accuracy" in r for r in restored if r["benchmark"] == "beavertails_30k_test")
    # the evaluation suite read the real benchmark files (../shared/data) and judged them with both judges
    suite = [r for r in restored if r["benchmark"] != "beavertails_30k_test"]
    assert {(r["benchmark"], r["judge"]) for r in suite} == {
        (b, j) for b in params.evaluation.benchmarks for j in params.evaluation.judges}
    assert all(r["n_prompts"] == params.evaluation.limit for r in suite)
    assert {r["defense"] for r in restored} == {"aligned", *defence_names(params), *params.defences.methods,
                                                "vaccine_aligned", "booster_aligned"}
    fused = results["06_model_fusion"]
    assert {r["fusion"] for r in fused} == {"aligned", "none", *fusion_names(params)}
    assert {r["inputs"] for r in fused} == tasks | {"+".join(params.attack.tasks)}
    assert {r["ablation"] for r in results["07_restoration_ablation"]} >= {
        "mask_sparsity", "rank_keep_ratio", "prune_rate", "epsilon", "tau", "seed", "scorer"}
    assert len(list(figures_dir("standin").glob("*.png"))) >= 13


# --------------------------------------------------------------------------------------------- what the run revealed
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from nlsr_lib.standin import build_base

    return build_base(tmp_path_factory.mktemp("standin_base") / "base")


def test_a_prompt_too_long_for_max_length_is_cut_so_its_completion_keeps_its_share(base):
    """trl cuts only completions: a prompt filling ``max_length`` left none (ORPO/SimPO: NaN loss at step 1)."""
    from nlsr_lib.models import load_tokenizer
    from nlsr_lib.train.alignment import fit_prompts

    tok = load_tokenizer(base)
    long_prompt = "How do I pick a lock without the key? " * 20
    rows = [{"prompt": long_prompt, "chosen": "I can't help with that.", "rejected": "Sure, first get a pick."},
            {"prompt": "Hi?", "completion": "Hello there, how are you today? " * 20},
            {"prompt": "Tell me a joke.", "completion": "No."}]
    fitted, cut = fit_prompts(rows, tok, max_length=32)
    assert cut == 1 and fitted[1:] == rows[1:]  # a long completion is trl's to cut; a short row is untouched
    prompt = fitted[0]["prompt"]
    assert long_prompt.startswith(prompt) and prompt
    completion = max(len(tok(fitted[0][k], add_special_tokens=False)["input_ids"]) + 1 for k in ("chosen", "rejected"))
    assert len(tok(prompt)["input_ids"]) + completion <= 32 + 1  # + 1: the cut may re-encode one token apart


@pytest.mark.usefixtures("one_torch_thread")
def test_orpo_on_a_prompt_as_long_as_max_length_trains_to_a_finite_loss(base, tmp_path):
    from nlsr_lib.config import LoraConfig, ModelConfig, TrainConfig
    from nlsr_lib.models import load_causal_lm, load_tokenizer, peft_lora_config
    from nlsr_lib.train.alignment import get_method, train_adapter

    tok, model = load_tokenizer(base), load_causal_lm(base, ModelConfig(dtype="bfloat16", device_map="cpu"))
    rows = [{"prompt": "Explain how vaccines train the immune system, in detail. " * 8, "chosen": "Gladly: they show it "
             "a harmless piece of a pathogen.", "rejected": "No."}] * 2
    tc = TrainConfig(learning_rate=1e-4, max_steps=1, batch_size=2, max_length=48, warmup_ratio=0.0)
    summary = train_adapter(get_method("orpo"), model, tok, rows, tc, peft_lora_config(LoraConfig(r=2, alpha=4)),
                            tmp_path / "adapter", "bfloat16", quiet=True)
    assert summary["prompts_cut"] == 2 and math.isfinite(summary["train_loss"])


def test_model_paths_are_relative_to_the_params_file_that_declares_them(base, tmp_path, monkeypatch):
    (tmp_path / "profile").mkdir()
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "models" / "base"
    link.parent.mkdir()
    link.symlink_to(base)
    p = tmp_path / "profile" / "p.yaml"
    p.write_text(f"extends: {PARAMS / 'smoke.yaml'}\nmodel: {{name: ../models/base}}\n"
                 "judges: {moderation: {model: ./judge}}\n")
    with pytest.raises(ParamsError, match=rf"judges\.moderation\.model: local model folder '\./judge' does not exist: "
                                          rf"looked for {tmp_path}/profile/judge \(relative to {tmp_path}/profile"):
        load_params(p)
    (tmp_path / "profile" / "judge").mkdir()
    params = load_params(p)
    assert params.model.name == str(base) and params.judges.moderation.model == str(tmp_path / "profile" / "judge")
    monkeypatch.chdir(REPO / "notebooks")  # where the notebooks' kernels run: the same folders
    assert load_params(p).model.name == str(base)
    # hub ids, 'tiny' and absolute paths are kept as written (an absolute one is checked when it is loaded)
    kept = load_params(p, {"model.name": "meta-llama/Meta-Llama-3-8B", "judges.moderation.model": "/nonexistent/j"})
    assert (kept.model.name, kept.judges.moderation.model) == ("meta-llama/Meta-Llama-3-8B", "/nonexistent/j")


def test_a_file_that_extends_another_may_re_point_its_missing_paths(tmp_path):
    """standin.yaml's asset paths do not exist until built; a file extending it re-points them and loads."""
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    (tmp_path / "parent.yaml").write_text(f"extends: {PARAMS / 'smoke.yaml'}\n"
                                          "data: {sources: {alpaca: ./absent/alpaca.jsonl}}\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\ndata: {sources: {alpaca: alpaca.jsonl}}\n")
    with pytest.raises(ParamsError, match=r"data\.sources\.alpaca: local path '\./absent/alpaca\.jsonl' does not "
                                          r"exist: .*the folder of parent\.yaml, which declares it"):
        load_params(tmp_path / "parent.yaml")
    assert load_params(tmp_path / "child.yaml").data.sources.alpaca == str(data)
    assert load_params(tmp_path / "parent.yaml", {"data.sources.alpaca": str(data)}).data.sources.alpaca == str(data)


def test_calibration_prompts_bound_the_answered_pool():
    from nlsr_lib.stages.regions import _saferlhf_test_rows

    smoke = load_params(PARAMS / "smoke.yaml")
    assert smoke.regions.calibration.prompts == -1 and _saferlhf_test_rows(smoke) == smoke.world.saferlhf_test
    assert _saferlhf_test_rows(load_params(PARAMS / "smoke.yaml", {"regions.calibration.prompts": 7})) == 7
    with pytest.raises(ParamsError, match=r"regions\.calibration\.prompts: 0 answers no prompt"):
        load_params(PARAMS / "smoke.yaml", {"regions.calibration.prompts": 0})
