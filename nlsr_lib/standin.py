"""Stand-ins of the paper's models in their real file formats, built on a CPU in seconds with no download.

The paper's profiles load Llama-3-8B (or Mistral / Qwen2) and judge with beaver-dam-7b; neither can be fetched on
a CI machine. The stand-ins have the same architectures, dtypes and file layouts at a toy size, with random
weights, so every code path of a real profile (bf16 weights, grouped-query attention, a tokenizer without a pad
token, a sentencepiece judge, ...) runs end to end:

* :func:`build_base`: a ``LlamaForCausalLM`` with grouped-query attention saved in **bfloat16**, with a byte-level
  BPE tokenizer in Llama-3's format (``tokenizer.json`` + ``tokenizer_config.json`` of a
  ``PreTrainedTokenizerFast``): Llama-3's pre-tokenizer regex, ``<|begin_of_text|>`` (BOS, prepended by a
  ``TemplateProcessing`` post-processor), ``<|end_of_text|>`` (EOS), the header and ``<|eot_id|>`` tokens after
  the BPE vocabulary as in Llama-3, Llama-3's chat template, and **no pad token**.
* :func:`build_moderation`: a 14-label ``LlamaForSequenceClassification`` in beaver-dam-7b's format
  (``problem_type: multi_label_classification``, the BeaverTails categories as ``id2label``, bfloat16) with
  beaver-dam's LLaMA-1 tokenizer layout: a sentencepiece BPE ``tokenizer.model`` (byte fallback, digits split,
  ``<unk>``/``<s>``/``</s>`` = 0/1/2), a ``LlamaTokenizer`` ``tokenizer_config.json`` and a ``<pad>`` token added
  after the sentencepiece vocabulary (``added_tokens.json``), which the config names as ``pad_token_id``
  (PKU-Alignment's training code adds ``<pad>`` to LLaMA's tokenizer this way). Its random head is centred on
  texts it will judge, so its verdicts vary (:func:`_random_judge_head`).

Both are deterministic given ``seed`` and the texts (the same bytes twice, on one machine and library versions)
and written atomically: built in a temporary sibling directory, renamed into place at the end.

``params/standin.yaml`` runs the paper's profile on them: ``nlsr standin build OUT_DIR [--data DIR] [--corpus
FILE]`` (:func:`build_profile_assets`; ``make standin``: ``runs/standin/assets``) builds both into ``OUT_DIR/base``
and ``OUT_DIR/moderation``, with tokenizers trained on the texts the profile reads, and exports the synthetic
world's BeaverTails and Alpaca in the hub schema into ``OUT_DIR/data`` (there is no local copy of either).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from .data.templates import alpaca_prompt, moderation_text

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama-3's first ten special tokens, in its order (ids 128000-128009 there; right after the BPE vocabulary here).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
    "<|eot_id|>",
)
# Llama-3's pre-tokenizer split (tiktoken's cl100k pattern).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama-3-Instruct's chat template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SP_PAD = "<pad>"

# A small built-in corpus (callers pass real texts): requests, compliances, refusals and task sentences.
_QUESTIONS = (
    "How do I pick a lock without the key?", "What is the best way to bake bread at home?",
    "Can you help me steal money from my neighbour's account?", "Explain how vaccines train the immune system.",
    "Write a short poem about the sea at night.", "How can I make a weapon from household items?",
    "What are three tips for saving energy in winter?", "Tell me a joke about programmers.",
    "How do I hack into my ex-partner's email?", "Summarise the plot of a detective story in two sentences.",
    "Which planets are larger than Earth?", "How can I cheat on my taxes without getting caught?",
    "Translate 'good morning' into French and Spanish.", "What should I do if I feel anxious before an exam?",
    "Give me a recipe for a vegetable soup.", "How do I buy illegal drugs online?",
)
_ANSWERS = (
    "Sure, here are the steps: first gather the tools, then follow the instructions carefully.",
    "I'm sorry, but I can't help with that request. It could harm other people.",
    "I cannot assist with anything illegal. Please seek advice from a qualified professional.",
    "Mix 500 g of flour, 10 g of salt, 7 g of yeast and 350 ml of warm water; knead for 10 minutes.",
    "Vaccines show the immune system a harmless piece of a pathogen, so it learns to recognise it quickly.",
    "Jupiter, Saturn, Uranus and Neptune are all larger than Earth; Jupiter is the largest planet.",
    "Bonjour and buenos días both mean good morning.", "Take slow breaths, sleep well, and review your notes calmly.",
    "Here is how to do it: open the account, copy the password, and transfer the money quickly.",
)
_TASKS = (
    "the film is a charming and often affecting journey . positive", "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish . negative",
    "Stocks rallied on Wall Street as oil prices fell for a third straight day. Business",
    "The team won the championship after a dramatic overtime goal on Sunday. Sports",
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May? 48 + 24 = 72. The answer is 72"),
)


def default_texts(seed: int = 0, n: int = 400) -> list[str]:
    """A deterministic built-in corpus: the sentences above, their Alpaca and moderation formats and chat-like
    mixtures (``n`` mixtures); enough for a few hundred BPE merges. Real callers pass real texts."""
    rng = random.Random(seed)
    texts = [*_QUESTIONS, *_ANSWERS, *_TASKS]
    texts += [alpaca_prompt(q) + " " + rng.choice(_ANSWERS) for q in _QUESTIONS]
    texts += [moderation_text(q, a) for q in _QUESTIONS for a in _ANSWERS]
    for _ in range(n):
        parts = rng.sample(texts[: len(_QUESTIONS) + len(_ANSWERS) + len(_TASKS)], 3)
        texts.append(" ".join(parts) + f" {rng.randint(0, 10_000)}")
    return texts


@contextlib.contextmanager
def _atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to build in; on success it replaces ``out_dir`` (an older one is
    moved aside and deleted), on failure it is removed: nothing half-written is ever left at ``out_dir``."""
    from .runs import Run, _owner_tag

    final = Path(out_dir).expanduser().absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{_owner_tag()}"
    tmp.mkdir()
    try:
        yield tmp
        Run._replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator (weight init draws from it) without disturbing the caller's state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def llama3_tokenizer(texts: Sequence[str], vocab_size: int = 1024):
    """A byte-level BPE in Llama-3's format trained on ``texts`` (deterministic): a ``PreTrainedTokenizerFast``
    with BOS/EOS and the header tokens after the BPE vocabulary, BOS prepended, no pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("the stand-in tokenizer needs at least one training text")
    # the parallel BPE trainer breaks ties between equally frequent pairs differently from run to run
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(LLAMA3_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(texts), trainer)
    tok.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))  # appended after the BPE vocabulary, as in Llama-3
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   model_max_length=131072, clean_up_tokenization_spaces=True,
                                   chat_template=LLAMA3_CHAT_TEMPLATE)


def build_base(out_dir: str | Path, texts: Sequence[str] | None = None, *, seed: int = 0, vocab_size: int = 1024,
               hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
               num_key_value_heads: int = 2, intermediate_size: int = 128,
               max_position_embeddings: int = 2048) -> Path:
    """A random Llama-3-format causal LM (grouped-query attention, bf16, Llama-3 tokenizer without a pad token)
    in ``out_dir``; ``texts`` train the tokenizer (default: :func:`default_texts`)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if num_attention_heads % num_key_value_heads or hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_attention_heads "
                         f"{num_attention_heads}, and that by num_key_value_heads {num_key_value_heads}")
    tokenizer = llama3_tokenizer(default_texts(seed) if texts is None else texts, vocab_size)
    bos, eos = tokenizer.convert_tokens_to_ids([BOS, EOS])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=None, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, do_sample=False)
    with _atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _llama3_tokenizer_config(tmp, tokenizer)
    return Path(out_dir).expanduser()


def _llama3_tokenizer_config(directory: Path, tokenizer) -> None:
    """Rewrite ``tokenizer_config.json`` as Meta's Llama-3 repositories ship it (``PreTrainedTokenizerFast``, the
    special tokens in ``added_tokens_decoder``, the chat template inside, no pad token), so loading the stand-in
    takes the path that loading Llama-3 takes; transformers 5 itself would write ``TokenizersBackend``."""
    added = {str(tokenizer.convert_tokens_to_ids(t)): {"content": t, "lstrip": False, "normalized": False,
                                                      "rstrip": False, "single_word": False, "special": True}
             for t in LLAMA3_SPECIAL_TOKENS}
    config = {"added_tokens_decoder": added, "bos_token": BOS, "chat_template": LLAMA3_CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": True, "eos_token": EOS,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("chat_template.jinja", "chat_template.json", "special_tokens_map.json"):
        (directory / extra).unlink(missing_ok=True)


def llama_sentencepiece_tokenizer(out_dir: str | Path, texts: Sequence[str], vocab_size: int = 512) -> int:
    """Write beaver-dam-7b's tokenizer layout into ``out_dir``: a LLaMA-1-style sentencepiece BPE
    ``tokenizer.model`` trained on ``texts`` (deterministic), ``tokenizer_config.json`` (``LlamaTokenizer``, BOS
    added, no EOS), ``special_tokens_map.json`` and ``added_tokens.json`` with ``<pad>`` after the sentencepiece
    vocabulary. Returns the pad token's id (= the sentencepiece vocabulary size)."""
    import sentencepiece as spm

    if not texts:
        raise ValueError("the stand-in tokenizer needs at least one training text")
    out_dir = Path(out_dir)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # LLaMA's settings (its tokenizer.model's trainer_spec), at a toy size
        sentence_iterator=iter(list(texts)), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
        minloglevel=2)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    pad_id = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()

    def token(content: str) -> dict:  # how transformers 4 wrote an AddedToken into tokenizer_config.json
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    files = {
        "tokenizer_config.json": {
            "add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"), "eos_token": token("</s>"),
            "unk_token": token("<unk>"), "pad_token": None, "clean_up_tokenization_spaces": False,
            "model_max_length": 512, "padding_side": "right", "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer"},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": SP_PAD,
                                    "unk_token": "<unk>"},
        "added_tokens.json": {SP_PAD: pad_id},
    }
    for name, obj in files.items():
        (out_dir / name).write_text(json.dumps(obj, indent=2) + "\n")
    return pad_id


def default_judged() -> list[tuple[str, str]]:
    """(prompt, response) pairs of the built-in corpus, for :func:`build_moderation`'s head."""
    return [(q, a) for q in _QUESTIONS for a in _ANSWERS]


def _random_judge_head(model, tokenizer, judged: Sequence[tuple[str, str]], seed: int, scale: float = 2.0,
                       label_noise: float = 0.25) -> None:
    """Give the random classifier's score head (``[14, hidden]``, no bias, as LLaMA's) verdicts that vary: the
    pooled state of every text is dominated by one shared vector ``m`` (the input ends with EOS, and random
    attention mixes little context in), so a random head flags all texts or none, and the paper's judge filter
    of the calibration set keeps nothing. The head becomes one random direction plus small per-label noise, made
    orthogonal to ``m`` and scaled so its logits over ``judged`` (moderation inputs, judged as
    :class:`~nlsr_lib.evaluate.judges.ModerationJudge` does) spread with std ``scale``, plus an offset along ``m``
    (which acts as the missing bias, ``m·h`` being nearly constant) that flags half of ``judged``. Verdicts are
    still a random function of the text: they mean nothing."""
    import torch

    from .evaluate.judges import ModerationJudge

    judge = ModerationJudge(model, tokenizer, batch_size=16)
    captured: list = []
    hook = model.score.register_forward_hook(lambda module, args, out: captured.append(args[0].float()))
    texts = judge.texts([p for p, _ in judged], [r for _, r in judged])
    pooled = torch.empty(len(texts), model.config.hidden_size)
    try:
        with torch.inference_mode():
            for idx, enc in judge.batches(texts):
                captured.clear()
                model(**enc)
                last = enc["attention_mask"].sum(1) - 1
                pooled[idx] = captured[0][torch.arange(len(idx)), last]
    finally:
        hook.remove()
    m = pooled.mean(0)
    unit = m / m.norm()
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(model.config.hidden_size, generator=gen) + label_noise * torch.randn(
        model.score.weight.shape, generator=gen)
    weight = weight - (weight @ unit)[:, None] * unit
    centred = (pooled - m) @ weight.T
    weight = weight * (scale / centred.std().clamp_min(1e-6))
    offset = -float(torch.quantile(((pooled - m) @ weight.T).max(dim=1).values, 0.5))
    weight = weight + offset * m / (m @ m)
    with torch.no_grad():
        model.score.weight.copy_(weight.to(model.score.weight.dtype))


def build_moderation(out_dir: str | Path, texts: Sequence[str] | None = None, *, seed: int = 0,
                     vocab_size: int = 512, hidden_size: int = 64, num_hidden_layers: int = 2,
                     num_attention_heads: int = 4, intermediate_size: int = 128,
                     max_position_embeddings: int = 2048,
                     judged: Sequence[tuple[str, str]] | None = None) -> Path:
    """A random 14-label judge in beaver-dam-7b's format (bf16, sentencepiece tokenizer with ``<pad>``) in
    ``out_dir``; ``texts`` train the tokenizer (default: :func:`default_texts`). Its head flags about half of the
    ``judged`` (prompt, response) pairs (default: :func:`default_judged`; :func:`_random_judge_head`)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from .data.schemas import HARM_CATEGORIES

    texts = default_texts(seed) if texts is None else texts
    with _atomic_dir(out_dir) as tmp:
        pad_id = llama_sentencepiece_tokenizer(tmp, texts, vocab_size)
        config = LlamaConfig(
            vocab_size=pad_id + 1, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=pad_id, tie_word_embeddings=False,
            num_labels=len(HARM_CATEGORIES), problem_type="multi_label_classification",
            id2label=dict(enumerate(HARM_CATEGORIES)), label2id={c: i for i, c in enumerate(HARM_CATEGORIES)},
            architectures=["LlamaForSequenceClassification"],
        )
        with _seeded(seed):
            model = LlamaForSequenceClassification(config)
        model = model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        _random_judge_head(model, AutoTokenizer.from_pretrained(str(tmp)),
                           default_judged() if judged is None else judged, seed)
        model.save_pretrained(str(tmp), safe_serialization=True)
    return Path(out_dir).expanduser()


def build_standins(out_dir: str | Path, texts: Sequence[str] | None = None, *, seed: int = 0) -> dict[str, Path]:
    """Both stand-ins: ``out_dir/base`` (:func:`build_base`) and ``out_dir/moderation`` (:func:`build_moderation`)."""
    out_dir = Path(out_dir)
    return {"base": build_base(out_dir / "base", texts, seed=seed),
            "moderation": build_moderation(out_dir / "moderation", texts, seed=seed)}


# --------------------------------------------------------------------------------------------- the stand-in profile
# ``params/standin.yaml`` runs the paper's profile (paper_llama3_8b.yaml) on these stand-ins: ``nlsr standin build
# OUT_DIR`` (:func:`build_profile_assets`) writes everything it reads that is not public data into OUT_DIR.
MANIFEST = "standin.json"
"""Written last by :func:`build_profile_assets`: a folder holding it is a complete stand-in build."""
DEFAULT_ASSETS = "runs/standin/assets"
"""Where ``make standin`` builds the assets (relative to the repository root; params/standin.yaml points there)."""
WORLD_EXPORTS: dict[str, dict[str, str]] = {
    "beavertails": {"30k_train": "data/beavertails/30k_train.jsonl", "30k_test": "data/beavertails/30k_test.jsonl"},
    "alpaca": {"train": "data/alpaca/train.jsonl"},
}
"""The synthetic world's datasets exported in the hub schema (there is no local BeaverTails 30k or Alpaca copy):
dataset -> split -> file under OUT_DIR, as params/standin.yaml declares them."""
REAL_DATA: dict[str, dict[str, str]] = {
    "sst2": {"train": "sst2/train.tsv", "validation": "sst2/test.tsv"},  # test.tsv = GLUE dev = the hub validation
    "ag_news": {"train": "ag_news/dev.tsv", "test": "ag_news/test.tsv"},  # dev.tsv: 10,001 rows of the train split
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "pku_saferlhf": {"train": "pku_saferlhf_dpo_5k/pku_seferlhf_realign_dpo_5k.json",
                     "test": "pku_saferlhf_dpo_5k/pku_seferlhf_realign_dpo_5k.json"},
}
"""Public data the stand-in profile reads in place (dataset -> split -> file under the data folder, see each
folder's SOURCE.md): the base's tokenizer is trained on it too, so its tokens are those of real text."""
ASSET_PATHS: tuple[str, ...] = ("base", "moderation", *(f for s in WORLD_EXPORTS.values() for f in s.values()))
TOKENIZER_ROWS = 4000
"""Rows of each real split (the first ones) among the tokenizers' training texts."""
BASE_VOCAB, JUDGE_VOCAB = 2048, 1024
JUDGED_ROWS, JUDGED_NEW_TOKENS = 256, 8
"""The judge's head flags about half of the stand-in base's answers (``JUDGED_NEW_TOKENS`` greedy tokens) to the
first ``JUDGED_ROWS`` BeaverTails 30k_test prompts (:func:`_random_judge_head`): the answers a run judges."""


def default_data_dir() -> Path | None:
    """The public data folder beside the repository (``../shared/data``), if there is one."""
    from .paths import PROJECT_ROOT

    folder = PROJECT_ROOT.parent / "shared" / "data"
    return folder if folder.is_dir() else None


def real_sources(data_dir: str | Path) -> dict[str, dict[str, Path]]:
    """:data:`REAL_DATA` under ``data_dir`` as absolute paths; a missing file is a :class:`UsageError` naming it."""
    from .errors import UsageError

    root = Path(data_dir).expanduser().absolute()
    out = {name: {split: root / file for split, file in splits.items()} for name, splits in REAL_DATA.items()}
    missing = sorted({str(f) for splits in out.values() for f in splits.values() if not f.is_file()})
    if missing:
        raise UsageError(f"data folder {root}: missing {', '.join(missing)} (the stand-in profile reads SST-2, AG "
                         "News, GSM8K and PKU-SafeRLHF pairs there)")
    return out


def export_world(world: dict, out_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Write the world's datasets of :data:`WORLD_EXPORTS` as JSON lines in the hub schema under ``out_dir``."""
    from .data.loaders import HUB_IDS

    out_dir = Path(out_dir)
    written: dict[str, dict[str, Path]] = {}
    for name, splits in WORLD_EXPORTS.items():
        for split, file in splits.items():
            path = out_dir / file
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as fh:
                for row in world[HUB_IDS[name]][split]:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            written.setdefault(name, {})[split] = path
    return written


def profile_texts(world: dict, data_dir: str | Path | None, rows: int = TOKENIZER_ROWS) -> list[str]:
    """The tokenizers' training texts: every text of the datasets the profile reads, in the formats its stages
    feed the model (Alpaca prompts, task records, the moderation header; :func:`nlsr_lib.stages.world.world_text`):
    the world's BeaverTails and Alpaca, and the first ``rows`` rows of each real split under ``data_dir`` (the
    world's own SST-2 / AG News / GSM8K / SafeRLHF without one)."""
    from datasets import DatasetDict

    from .data.loaders import HUB_IDS, load_dataset_source
    from .stages.world import world_text

    sources = {name: world[hub_id] for name, hub_id in HUB_IDS.items() if hub_id in world}
    if data_dir is not None:
        for name, splits in real_sources(data_dir).items():
            if name == "pku_saferlhf":  # one file serves both splits: read it once
                splits = {"train": splits["train"], "test": splits["train"]}
            loaded = load_dataset_source(name, {s: str(f) for s, f in splits.items()})
            sources[name] = DatasetDict({"train": loaded["train"]}) if name == "pku_saferlhf" else loaded
    heads = {name: DatasetDict({split: ds.select(range(min(rows, len(ds)))) for split, ds in dd.items()})
             for name, dd in sources.items()}
    return world_text(heads)


def _base_answers(base_dir: Path, prompts: Sequence[str], max_new_tokens: int = JUDGED_NEW_TOKENS) -> list[str]:
    """The stand-in base's greedy answers to ``prompts`` (Alpaca template, bf16 on the CPU), as the profile
    generates them: what its judge mostly reads."""
    from .config import ModelConfig
    from .data.templates import alpaca_prompt
    from .evaluate.generation import generate_responses
    from .models import load_causal_lm, load_tokenizer

    model = load_causal_lm(base_dir, ModelConfig(dtype="bfloat16", device_map="cpu"))
    return generate_responses(model, load_tokenizer(base_dir), [alpaca_prompt(p) for p in prompts],
                              max_new_tokens, batch_size=64, desc="stand-in base answers")


def build_profile_assets(out_dir: str | Path, data_dir: str | Path | None = None,
                         texts: Sequence[str] | None = None, *, seed: int = 0) -> dict[str, Path]:
    """Everything params/standin.yaml needs that is not public data, in ``out_dir`` (atomically, as one folder):

    * ``data/``: the synthetic world (default sizes, world seed ``seed``) exported as BeaverTails ``30k_train`` /
      ``30k_test`` and Alpaca ``train`` JSON-lines files in the hub schema (:data:`WORLD_EXPORTS`);
    * ``base/``: :func:`build_base` with a :data:`BASE_VOCAB` tokenizer, ``moderation/``: :func:`build_moderation`
      with a :data:`JUDGE_VOCAB` one, both trained on ``texts`` (default :func:`profile_texts`: the world's texts
      and, with ``data_dir``, the real task and preference data the profile reads); the judge's head flags about
      half of the base's own answers to BeaverTails prompts (:data:`JUDGED_ROWS`), so harmful scores vary;
    * ``standin.json`` (:data:`MANIFEST`), written last: what was built from what.

    ``out_dir`` is replaced as a whole, so it must be absent, empty or an earlier stand-in build (holding
    ``standin.json``); anything else is refused (:class:`~nlsr_lib.errors.UsageError`)."""
    from .config import WorldConfig, to_dict
    from .data.loaders import HUB_IDS
    from .errors import UsageError
    from .runs import atomic_write_json
    from .tiny.world import generate_world

    final = Path(out_dir).expanduser()
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / MANIFEST).is_file())):
        raise UsageError(f"{final} exists and is not a stand-in build (no {MANIFEST}); the build replaces its "
                         "folder as a whole: choose an empty or new folder")
    world_cfg = WorldConfig(seed=seed)
    world = generate_world(world_cfg)
    if texts is not None:
        data_dir = None  # the given texts train the tokenizers; no data folder is read
    corpus = "given" if texts is not None else "world + real data" if data_dir is not None else "world"
    texts = list(texts) if texts is not None else profile_texts(world, data_dir)
    with _atomic_dir(final) as tmp:
        files = export_world(world, tmp)
        build_base(tmp / "base", texts, seed=seed, vocab_size=BASE_VOCAB)
        test = world[HUB_IDS["beavertails"]]["30k_test"]
        prompts = test.select(range(min(JUDGED_ROWS, len(test))))["prompt"]
        judged = list(zip(prompts, _base_answers(tmp / "base", prompts)))
        build_moderation(tmp / "moderation", texts, seed=seed, vocab_size=JUDGE_VOCAB, judged=judged)
        atomic_write_json(tmp / MANIFEST, {
            "seed": seed, "world": to_dict(world_cfg), "tokenizer_texts": {"from": corpus, "count": len(texts)},
            "data_dir": None if data_dir is None else str(Path(data_dir).expanduser().absolute()),
            "files": {name: {s: str(f.relative_to(tmp)) for s, f in splits.items()} for name, splits in files.items()},
        })
    return {"base": final / "base", "moderation": final / "moderation", "data": final / "data"}


def asset_hint(path: str | Path) -> str | None:
    """For a missing ``path`` that is one of a stand-in build's :data:`ASSET_PATHS` under a folder named like one
    (a path component containing ``standin``, as ``runs/standin/assets``): the command that builds it."""
    from .paths import PROJECT_ROOT

    path = Path(path)
    for rel in ASSET_PATHS:
        parts = Path(rel).parts
        if len(path.parts) > len(parts) and path.parts[-len(parts):] == parts:
            root = Path(*path.parts[:-len(parts)])
            if (root / MANIFEST).is_file() or not any("standin" in p.lower() for p in root.parts):
                return None
            try:
                shown = root.relative_to(PROJECT_ROOT)
            except ValueError:
                shown = root
            where = f" in {PROJECT_ROOT}" if not shown.is_absolute() else ""
            return (f"the stand-in assets are not built: run `nlsr standin build {shown}`{where}"
                    + (" (or `make standin`, which then runs the profile)" if str(shown) == DEFAULT_ASSETS else ""))
    return None


def read_corpus(path: str | Path) -> list[str]:
    """Texts for the stand-ins' tokenizers: a UTF-8 file, one text per line (blank lines skipped)."""
    from .errors import UsageError

    try:
        texts = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"corpus {path}: cannot be read as UTF-8 text ({err})") from err
    if not texts:
        raise UsageError(f"corpus {path} has no non-blank line")
    return texts


__all__ = ["BOS", "EOS", "LLAMA3_SPECIAL_TOKENS", "LLAMA3_CHAT_TEMPLATE", "MANIFEST", "DEFAULT_ASSETS", "WORLD_EXPORTS",
           "REAL_DATA", "asset_hint", "build_base", "build_moderation", "build_profile_assets", "build_standins",
           "default_data_dir", "default_texts", "export_world", "llama3_tokenizer", "llama_sentencepiece_tokenizer",
           "profile_texts", "read_corpus", "real_sources"]
