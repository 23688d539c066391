"""Stages of the world and the models everything starts from (DESIGN.md §2): the synthetic world, the tokenizer,
the base model and the moderation judge; and the datasets every other stage reads.

A dataset is loaded only when a build needs it, once per run: :func:`load_source` (one source, from the world or
a hub id / local copy, :mod:`nlsr_lib.data.loaders`), or :func:`load_sources` (a mapping that loads each source on
first access, for code that takes every dataset by name, such as the tokenizer's and the pretraining corpus).
A source that no requested stage reads is never touched, so an unusable hub id there does not stop a run. A stage
depends on a local source by content (:func:`source_inputs`), not by path.

A real profile's base model and judge are pointers to a hub id or path: nothing is downloaded into the run, and
where the model lives is known from params (:func:`base_location`, :func:`moderation_location`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..config import Params, to_dict
from ..runs import Artifact, Run, atomic_write_json
from ..tiny.world import WORLD_VERSION
from .graph import content_hash, request, stage_kind, write_pointer

TINY = "tiny"
CORPUS_SOURCES = ("beavertails", "pku_saferlhf", "sst2", "ag_news", "gsm8k", "alpaca")
"""The sources the tiny tokenizer and base model are trained on (:func:`world_text`, the pretraining corpus)."""
SOURCE_NAMES = (*CORPUS_SOURCES, "alpaca_eval")
WORLD_KEYS = {"beavertails": "PKU-Alignment/BeaverTails", "pku_saferlhf": "PKU-Alignment/PKU-SafeRLHF-30K",
              "sst2": "sst2", "ag_news": "ag_news", "gsm8k": "gsm8k", "alpaca": "tatsu-lab/alpaca"}


def is_tiny(params: Params) -> bool:
    return params.model.name == TINY


# --------------------------------------------------------------------------------------------- data
@stage_kind("world", version=WORLD_VERSION, reads=("world",))
def world_stage(params: Params, run: Run) -> Artifact:
    """The synthetic world (spec/synthetic_world.md §1-2), saved with the hub datasets' schemas."""
    from ..tiny.world import generate_world, save_world

    def build(out: Path) -> dict:
        world = generate_world(params.world)
        save_world(world, out)
        return {name: {split: len(ds) for split, ds in dd.items()} for name, dd in world.items()}

    return request(params, run, "world", "world", build)


def uses_world(params: Params, *names: str) -> bool:
    """Whether any of the sources ``names`` (all when none given) is the synthetic world."""
    sources = to_dict(params.data.sources)
    return any(sources[n] == "synthetic" for n in (names or SOURCE_NAMES))


def source_inputs(params: Params, run: Run, *names: str) -> tuple[dict[str, Artifact], dict[str, Any]]:
    """What a stage reading the sources ``names`` depends on: the world artifact (if one of them is synthetic) and,
    per source, ``synthetic``, the hub id, or the content of a local copy (keyed by content, not path):
    ``sha256:<hex>`` of a file or ``save_to_disk`` folder, ``{split: sha256:<hex>}`` of a split -> file mapping
    (splits sorted, so the order they are written in does not matter)."""
    sources = to_dict(params.data.sources)
    values = {name: _source_value(run, sources[name]) for name in names}
    inputs = {"world": world_stage(params, run)} if uses_world(params, *names) else {}
    return inputs, values


def _source_value(run: Run, where: str | dict[str, str]) -> str | dict[str, str]:
    from ..data.loaders import source_form

    form = source_form(where)
    if form == "mapping":
        return {split: _content_key(run, where[split]) for split in sorted(where)}
    return _content_key(run, where) if form in ("file", "directory") else where


def _content_key(run: Run, where: str) -> str:
    """``sha256:<hex>`` of a local file or folder (a compressed file also names its format: ``#.tsv.gz``, since the
    suffix before ``.gz`` decides how it is parsed)."""
    path = Path(where).expanduser()
    key = "sha256:" + run.memo(f"content/{path}", lambda: content_hash(path))
    compressed = path.is_file() and path.suffix.lower() == ".gz"
    return f"{key}#{''.join(path.suffixes[-2:]).lower()}" if compressed else key


def load_source(params: Params, run: Run, name: str) -> Any:
    """Dataset ``name`` as a ``DatasetDict`` keyed by split, from the world or a hub id / local copy, read once per
    run when a build first needs it (call inside builds only)."""
    if name not in SOURCE_NAMES:
        raise ValueError(f"unknown source {name!r}; allowed: {', '.join(SOURCE_NAMES)}")
    return run.memo(f"source/{name}", lambda: _load_source(params, run, name))


def _load_source(params: Params, run: Run, name: str) -> Any:
    where = getattr(params.data.sources, name)
    if where == "synthetic" and name == "alpaca_eval":  # outside the world artifact: generated from its seed
        from ..tiny.alpaca_eval import alpaca_eval_dataset

        return alpaca_eval_dataset(params.world.seed, load_source(params, run, "alpaca")["train"])
    if where == "synthetic":
        from ..tiny.world import load_world

        world = run.memo("world_datasets", lambda: load_world(world_stage(params, run).path))
        return world[WORLD_KEYS[name]]
    from ..data.loaders import load_dataset_source

    return load_dataset_source(name, where)


class Sources(Mapping):
    """Every source by name, each loaded by :func:`load_source` on first access (never all at once)."""

    def __init__(self, params: Params, run: Run):
        self._params, self._run = params, run

    def __getitem__(self, name: str) -> Any:
        if name not in SOURCE_NAMES:
            raise KeyError(name)
        return load_source(self._params, self._run, name)

    def __contains__(self, name: object) -> bool:  # without loading (Mapping's default would)
        return name in SOURCE_NAMES

    def __iter__(self) -> Iterator[str]:
        return iter(SOURCE_NAMES)

    def __len__(self) -> int:
        return len(SOURCE_NAMES)


def load_sources(params: Params, run: Run) -> Sources:
    """The datasets by source name, for code that takes them all (the tokenizer's text, the pretraining corpus,
    the alignment rows); each loads on first access."""
    return Sources(params, run)


def world_text(sources: Mapping[str, Any]) -> list[str]:
    """All text of the world, for tokenizer training (prompts, responses, task inputs and outputs)."""
    from ..data.tasks import TASKS
    from ..data.templates import PROMPT_INPUT, PROMPT_NO_INPUT, alpaca_prompt

    texts = [PROMPT_INPUT, PROMPT_NO_INPUT, "BEGINNING OF CONVERSATION: USER: ASSISTANT:"]
    for split in sources["beavertails"].values():
        texts += [r["prompt"] + "\n" + r["response"] for r in split]
    for split in sources["pku_saferlhf"].values():
        texts += [r["prompt"] + "\n" + r["response_0"] + "\n" + r["response_1"] for r in split]
    texts += [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in sources["alpaca"]["train"]]
    for task in (t for t in TASKS.values() if t.in_corpus):
        for split in sources[task.name].values():
            for row in split:
                rec = task.to_record(row)
                texts.append(alpaca_prompt(rec["instruction"], rec["input"]) + rec["output"])
    return texts


# --------------------------------------------------------------------------------------------- models
@stage_kind("tokenizer", reads=("tokenizer",), consumes=("world",))
def tokenizer_stage(params: Params, run: Run) -> Artifact:
    """BPE tokenizer trained on the world (tiny profile; real profiles use the base model's tokenizer)."""
    from ..tiny.model import train_tokenizer

    inputs, values = source_inputs(params, run, *CORPUS_SOURCES)

    def build(out: Path) -> dict:
        tok = train_tokenizer(world_text(load_sources(params, run)), params.tokenizer.vocab_size, out)
        return {"vocab_size": len(tok)}

    return request(params, run, "tokenizer", "tokenizer", build, inputs=inputs, values=values)


def base_location(params: Params, base: Artifact) -> str:
    """Where the base model lives: the tiny model's artifact directory, or the hub id / path of ``model.name``."""
    return str(base.path) if is_tiny(params) else params.model.name


@stage_kind("base_model", reads=("model", "pretrain", "seed"), consumes=("tokenizer", "world"), device="gpu")
def base_model_stage(params: Params, run: Run) -> Artifact:
    """The base model: pretrained from scratch on the world (tiny) or a pointer to a hub id / path."""
    if not is_tiny(params):
        return request(params, run, "base_model", "base_model", lambda out: write_pointer(out, params.model.name))
    import torch
    from transformers import LlamaForCausalLM

    from ..models import count_parameters, load_tokenizer
    from ..tiny.model import pretrain, pretraining_corpus, tiny_llama_config

    tok_artifact = tokenizer_stage(params, run)
    inputs, values = source_inputs(params, run, *CORPUS_SOURCES)

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

    p = params.pretrain
    return request(params, run, "base_model", "base_model", build, inputs={"tokenizer": tok_artifact, **inputs},
                   values=values, counts={"trainings": 1, "training_tokens": p.steps * p.batch_size * p.max_length})


def moderation_location(params: Params, moderation: Artifact) -> str:
    """Where the moderation judge lives: the tiny judge's directory, or ``judges.moderation.model``."""
    model = params.judges.moderation.model
    return str(moderation.path) if model == TINY else model


@stage_kind("moderation", reads=("judges.moderation", "seed"), consumes=("tokenizer", "world"), device="gpu")
def moderation_stage(params: Params, run: Run) -> Artifact:
    """The moderation judge: the tiny classifier trained on the world, or a pointer to beaver-dam-7b. The tiny
    judge must reach ``judges.moderation.min_heldout_accuracy`` on held-out rows, or the stage fails."""
    cfg = params.judges.moderation
    if cfg.model != TINY:
        return request(params, run, "moderation", "moderation", lambda out: write_pointer(out, cfg.model))
    from ..data.builders import moderation_examples
    from ..models import load_tokenizer
    from ..tiny.judge import train_tiny_moderation

    tok_artifact = tokenizer_stage(params, run)
    inputs, values = source_inputs(params, run, "beavertails")

    def build(out: Path) -> dict:
        beaver = load_source(params, run, "beavertails")
        summary = train_tiny_moderation(load_tokenizer(tok_artifact.path), moderation_examples(beaver["30k_train"]),
                                        moderation_examples(beaver["30k_test"]), cfg, params.seed, out)
        accuracy = summary["heldout_accuracy"]
        if accuracy < cfg.min_heldout_accuracy:
            raise RuntimeError(f"the tiny moderation judge reached held-out accuracy {accuracy:.3f} < "
                               f"judges.moderation.min_heldout_accuracy {cfg.min_heldout_accuracy}; train it longer")
        return summary

    tokens = cfg.train_steps * cfg.train_batch_size * cfg.max_length
    return request(params, run, "moderation", "moderation", build, inputs={"tokenizer": tok_artifact, **inputs},
                   values=values, counts={"trainings": 1, "training_tokens": tokens})
