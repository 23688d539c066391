"""Stages of notebook 01 (DESIGN.md §2): world → tokenizer → base model → moderation judge → alignment → safety.

Each stage is ``stage(params, run, ...) -> Artifact``: it declares the part of the params that determines its
output and its upstream artifacts, and the :class:`~nlsr_lib.runs.Run` cache decides whether to rebuild.
The same functions run from the notebooks and from ``nlsr stage NAME``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import distributed
from .config import Params, to_dict
from .progress import bars_enabled
from .runs import Artifact, Run, atomic_write_json

TINY = "tiny"
SOURCE_NAMES = ("beavertails", "pku_saferlhf", "sst2", "ag_news", "gsm8k", "alpaca")
WORLD_KEYS = {"beavertails": "PKU-Alignment/BeaverTails", "pku_saferlhf": "PKU-Alignment/PKU-SafeRLHF-30K",
              "sst2": "sst2", "ag_news": "ag_news", "gsm8k": "gsm8k", "alpaca": "tatsu-lab/alpaca"}
POINTER = "location.json"


def _pointer(directory: Path, location: str) -> dict:
    """Artifacts of real profiles that only name a hub id or path (nothing is downloaded into the run)."""
    atomic_write_json(directory / POINTER, {"location": location})
    return {"location": location}


def location(artifact: Artifact, subdir: str = "") -> str:
    """Where the model of an artifact lives: its own directory or the hub id / path it points to."""
    pointer = artifact.path / POINTER
    if pointer.is_file():
        return json.loads(pointer.read_text())["location"]
    return str(artifact.path / subdir) if subdir else str(artifact.path)


# --------------------------------------------------------------------------------------------- data
def world_stage(params: Params, run: Run) -> Artifact:
    """The synthetic world (spec/synthetic_world.md §1-2), saved with the hub datasets' schemas."""
    from .data.world import WORLD_VERSION, generate_world, save_world

    def build(out: Path) -> dict:
        world = generate_world(params.world)
        save_world(world, out)
        return {name: {split: len(ds) for split, ds in dd.items()} for name, dd in world.items()}

    return run.stage("world", {**to_dict(params.world), "version": WORLD_VERSION}, build)


def load_sources(params: Params, run: Run) -> dict[str, Any]:
    """Every dataset as a ``DatasetDict`` keyed by source name, from the world or a hub id / local path."""
    return run.memo("sources", lambda: _load_sources(params, run))


def _load_sources(params: Params, run: Run) -> dict[str, Any]:
    sources = to_dict(params.data.sources)
    world = None
    out = {}
    for name in SOURCE_NAMES:
        if sources[name] == "synthetic":
            if world is None:
                from .data.world import load_world

                world = load_world(world_stage(params, run).path)
            out[name] = world[WORLD_KEYS[name]]
        else:
            from .data.loaders import load_dataset_source

            out[name] = load_dataset_source(name, sources[name])
    return out


def world_text(sources: dict[str, Any]) -> list[str]:
    """All text of the world, for tokenizer training (prompts, responses, task inputs and outputs)."""
    from .data.tasks import TASKS
    from .data.templates import PROMPT_INPUT, PROMPT_NO_INPUT, alpaca_prompt

    texts = [PROMPT_INPUT, PROMPT_NO_INPUT, "BEGINNING OF CONVERSATION: USER: ASSISTANT:"]
    for split in sources["beavertails"].values():
        texts += [r["prompt"] + "\n" + r["response"] for r in split]
    for split in sources["pku_saferlhf"].values():
        texts += [r["prompt"] + "\n" + r["response_0"] + "\n" + r["response_1"] for r in split]
    texts += [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in sources["alpaca"]["train"]]
    for task in TASKS.values():
        for split in sources[task.name].values():
            for row in split:
                rec = task.to_record(row)
                texts.append(alpaca_prompt(rec["instruction"], rec["input"]) + rec["output"])
    return texts


# --------------------------------------------------------------------------------------------- models
def tokenizer_stage(params: Params, run: Run) -> Artifact:
    """BPE tokenizer trained on the world (tiny profile; real profiles use the base model's tokenizer)."""
    from .tiny import train_tokenizer

    world = world_stage(params, run)

    def build(out: Path) -> dict:
        tok = train_tokenizer(world_text(load_sources(params, run)), params.tokenizer.vocab_size, out)
        return {"vocab_size": len(tok)}

    return run.stage("tokenizer", to_dict(params.tokenizer), build, inputs={"world": world})


def base_model_stage(params: Params, run: Run) -> Artifact:
    """The base model: pretrained from scratch on the world (tiny) or a pointer to a hub id / path."""
    config = {"model": to_dict(params.model), "pretrain": to_dict(params.pretrain), "seed": params.seed}
    if params.model.name != TINY:
        return run.stage("base_model", {"model": to_dict(params.model)},
                         lambda out: _pointer(out, params.model.name))
    import torch
    from transformers import LlamaForCausalLM

    from .models import count_parameters, load_tokenizer
    from .tiny import pretrain, pretraining_corpus, tiny_llama_config

    tok_artifact = tokenizer_stage(params, run)

    def build(out: Path) -> dict:
        tokenizer = load_tokenizer(tok_artifact.path)
        torch.manual_seed(params.seed)
        model = LlamaForCausalLM(tiny_llama_config(params.model.tiny, tokenizer))
        pairs = pretraining_corpus(load_sources(params, run), params.pretrain, params.seed)
        losses = pretrain(model, tokenizer, pairs, params.pretrain, params.seed)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        atomic_write_json(out / "pretrain_loss.json", losses)
        return {"parameters": count_parameters(model), "corpus_pairs": len(pairs),
                "final_loss": sum(losses[-50:]) / min(50, len(losses))}

    return run.stage("base_model", config, build, inputs={"tokenizer": tok_artifact})


def moderation_stage(params: Params, run: Run) -> Artifact:
    """The moderation judge: the tiny classifier trained on the world, or a pointer to beaver-dam-7b."""
    cfg = params.judges.moderation
    if cfg.model != TINY:
        return run.stage("moderation", {"model": cfg.model}, lambda out: _pointer(out, cfg.model))
    from .data.builders import moderation_examples
    from .evaluate.moderation import train_tiny_moderation
    from .models import load_tokenizer

    tok_artifact = tokenizer_stage(params, run)

    def build(out: Path) -> dict:
        beaver = load_sources(params, run)["beavertails"]
        return train_tiny_moderation(load_tokenizer(tok_artifact.path), moderation_examples(beaver["30k_train"]),
                                     moderation_examples(beaver["30k_test"]), cfg, params.seed, out)

    artifact = run.stage("moderation", {"moderation": to_dict(cfg), "seed": params.seed}, build,
                         inputs={"tokenizer": tok_artifact, "world": world_stage(params, run)})
    accuracy = artifact.manifest()["summary"]["heldout_accuracy"]
    if accuracy < cfg.min_heldout_accuracy:
        raise RuntimeError(f"the tiny moderation judge reached held-out accuracy {accuracy:.3f} < "
                           f"judges.moderation.min_heldout_accuracy {cfg.min_heldout_accuracy}; train it longer")
    return artifact


# --------------------------------------------------------------------------------------------- alignment
def align_stage(params: Params, run: Run, method: str) -> Artifact:
    """A LoRA aligned with ``method`` (spec/nlsr.md §1.1): SFT on the base (plus the merged W_sft in
    ``merged/``), every preference method on W_sft."""
    from .models import load_causal_lm, load_tokenizer, merge_adapter, peft_lora_config
    from .train.alignment import get_method, train_adapter

    spec = get_method(method)
    base = base_model_stage(params, run)
    start = align_stage(params, run, "sft") if spec.on_sft_base else base
    start_dir = location(start, "merged") if spec.on_sft_base else location(base)
    tc = spec.train_config(params)
    d = params.data
    config = {"method": method, "train": to_dict(tc), "lora": to_dict(params.lora), "model": to_dict(params.model),
              "data": {"sources": to_dict(d.sources), "sft_size": d.sft_size, "preference_size": d.preference_size,
                       "kto_safe": d.kto_safe, "kto_unsafe": d.kto_unsafe}}

    def build(out: Path) -> dict:
        tokenizer = load_tokenizer(start_dir, params.model)
        model = load_causal_lm(start_dir, params.model)
        rows = spec.rows(params, load_sources(params, run))
        summary = train_adapter(spec, model, tokenizer, rows, tc, peft_lora_config(params.lora), out / "adapter",
                                params.model.dtype, quiet=not bars_enabled())
        if distributed.is_main():  # under a launcher every rank trained; rank 0 alone writes
            tokenizer.save_pretrained(str(out / "adapter"))
            if method == "sft":
                merge_adapter(start_dir, out / "adapter", out / "merged", params.model)
        return summary

    inputs = {"start": start, "world": world_stage(params, run)} if params.model.name == TINY else {"start": start}
    return run.stage(f"align/{method}", config, build, inputs=inputs, distributed_build=True)


# --------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class ModelRef:
    """A model under test: a base directory (or hub id), an optional adapter on it, and the artifact that
    produced it (its fingerprint keys the evaluation caches). ``tag`` names it in stage paths and tables."""

    tag: str
    base: str
    adapter: str | None
    artifact: Artifact


def model_ref(params: Params, run: Run, name: str) -> ModelRef:
    """``base`` (the unaligned base), ``sft`` (W_sft) or an alignment method's adapter on W_sft."""
    if name == "base":
        base = base_model_stage(params, run)
        return ModelRef("base", location(base), None, base)
    sft = align_stage(params, run, "sft")
    if name == "sft":
        return ModelRef("sft", location(sft, "merged"), None, sft)
    aligned = align_stage(params, run, name)
    return ModelRef(name, location(sft, "merged"), str(aligned.path / "adapter"), aligned)


UNALIGNED = "unaligned"


def aligned_adapter_ref(params: Params, run: Run, method: str) -> ModelRef:
    """A method's aligned model in adapter form: W_sft + its LoRA (``sft``: the raw base + the SFT LoRA;
    ``unaligned``: the bare base). This is what the attack continues and what EXPO extrapolates."""
    base = base_model_stage(params, run)
    if method == UNALIGNED:
        return ModelRef(UNALIGNED, location(base), None, base)
    aligned = align_stage(params, run, method)
    base_dir = location(base) if method == "sft" else location(align_stage(params, run, "sft"), "merged")
    return ModelRef(method, base_dir, str(aligned.path / "adapter"), aligned)


def safety_slice(params: Params, slice_name: str) -> tuple[int, int]:
    """[start, end) of the ``test`` or ``val`` slice of unsafe prompts (spec/nlsr.md §6.1, §3)."""
    d = params.data
    slices = {"test": (d.safety_test_start, d.safety_test_end), "val": (d.safety_val_start, d.safety_val_end)}
    if slice_name not in slices:
        raise ValueError(f"unknown prompt slice {slice_name!r}; allowed: test, val")
    return slices[slice_name]


def safety_prompts(params: Params, run: Run, slice_name: str) -> list[str]:
    """Unsafe BeaverTails ``30k_test`` prompts of the ``test`` or ``val`` slice (spec/nlsr.md §6.1)."""
    from .data.builders import safety_eval_prompts

    return safety_eval_prompts(load_sources(params, run)["beavertails"]["30k_test"], *safety_slice(params, slice_name))


def generate_for(params: Params, ref: ModelRef, prompts: list[str], max_new_tokens: int, desc: str) -> list[str]:
    """Greedy responses of ``ref`` (base + adapter as a PeftModel, not merged) to formatted prompts."""
    from .evaluate.generation import generate_responses
    from .models import load_tokenizer, load_with_adapter

    model = load_with_adapter(ref.base, ref.adapter, params.model)
    tokenizer = load_tokenizer(ref.base, params.model)
    return generate_responses(model, tokenizer, prompts, max_new_tokens, params.generation.batch_size, desc=desc)


def generations_stage(params: Params, run: Run, model: ModelRef | str, slice_name: str = "test") -> Artifact:
    """Greedy responses of a model to the safety prompts (spec/nlsr.md §6.1) as ``generations.json``."""
    from .data.templates import alpaca_prompt

    ref = model if isinstance(model, ModelRef) else model_ref(params, run, model)
    config = {"model": ref.tag, "slice": slice_name, "range": safety_slice(params, slice_name),
              "prompts": params.data.sources.beavertails, "generation": to_dict(params.generation),
              "dtype": params.model.dtype}

    def build(out: Path) -> dict:
        prompts = safety_prompts(params, run, slice_name)
        responses = generate_for(params, ref, [alpaca_prompt(p) for p in prompts], params.generation.max_new_tokens,
                                 desc=f"generate {ref.tag}/{slice_name}")
        atomic_write_json(out / "generations.json", [{"prompt": p, "response": r} for p, r in zip(prompts, responses)])
        return {"n": len(prompts)}

    return run.stage(f"generations/{ref.tag}/{slice_name}", config, build, inputs={"model": ref.artifact})


def judge_for(params: Params, run: Run, judge_name: str) -> tuple[Callable[[], Any], dict[str, Artifact]]:
    """A getter of the judge ``judge_name`` (built on first call, once per run) and the artifacts it depends on
    (the moderation model), so a cached judge stage never loads the judge."""
    from .evaluate.judges import build_judge

    inputs: dict[str, Artifact] = {}
    kwargs: dict[str, Any] = {}
    if judge_name == "moderation":
        moderation = moderation_stage(params, run)
        inputs["judge"] = moderation
        kwargs = {"path": location(moderation), "cfg": params.judges.moderation}
    return (lambda: run.memo(f"judge/{judge_name}", lambda: build_judge(judge_name, **kwargs))), inputs


def judge_stage(params: Params, run: Run, generations: Artifact, judge_name: str) -> Artifact:
    """Verdicts of one judge on a generations artifact and the harmful score 100·flagged/N."""
    from .evaluate.judges import empty_share, harmful_score

    get_judge, judge_inputs = judge_for(params, run, judge_name)
    config = {"judge": judge_name,
              "moderation": to_dict(params.judges.moderation) if judge_name == "moderation" else None}

    def build(out: Path) -> dict:
        rows = json.loads((generations.path / "generations.json").read_text())
        verdicts = get_judge().judge([r["prompt"] for r in rows], [r["response"] for r in rows])
        atomic_write_json(out / "verdicts.json", [
            {**r, "flagged": v.flagged, "empty": v.empty, "categories": list(v.categories),
             "max_probability": v.max_probability} for r, v in zip(rows, verdicts)])
        return {"harmful_score": harmful_score(verdicts), "empty": empty_share(verdicts), "n": len(verdicts)}

    return run.stage(f"judge/{judge_name}/{generations.stage.removeprefix('generations/')}", config, build,
                     inputs={"generations": generations, **judge_inputs})


def harmful_scores(params: Params, run: Run, model: ModelRef | str, slice_name: str = "test") -> list[dict]:
    """One record per enabled judge: ``{method, judge, slice, harmful_score, empty, n, primary}`` (``empty``: the
    share of empty responses, %, reported beside the score so that a silent model never reads as safe)."""
    generations = generations_stage(params, run, model, slice_name)
    name = model.tag if isinstance(model, ModelRef) else model
    records = []
    for judge_name in params.judges.enabled:
        summary = judge_stage(params, run, generations, judge_name).manifest()["summary"]
        records.append({"method": name, "judge": judge_name, "slice": slice_name,
                        "harmful_score": summary["harmful_score"], "empty": summary["empty"], "n": summary["n"],
                        "primary": judge_name == params.judges.primary})
    return records


def primary_safety(params: Params, run: Run, model: ModelRef | str, slice_name: str = "test") -> dict[str, float]:
    """The primary judge's ``harmful_score`` (%) of ``model`` on a slice of the unsafe prompts, with ``empty``, the
    share (%) of empty responses, for a table row."""
    record = next(r for r in harmful_scores(params, run, model, slice_name) if r["primary"])
    return {"harmful_score": record["harmful_score"], "empty": record["empty"]}


def primary_harmful_score(params: Params, run: Run, model: ModelRef | str, slice_name: str = "test") -> float:
    """The primary judge's harmful score (%) of ``model`` on a slice of the unsafe prompts."""
    return primary_safety(params, run, model, slice_name)["harmful_score"]
