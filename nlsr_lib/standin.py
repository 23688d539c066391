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
  (PKU-Alignment's training code adds ``<pad>`` to LLaMA's tokenizer this way).

Both are deterministic given ``seed`` and the texts (the same bytes twice, on one machine and library versions)
and written atomically: built in a temporary sibling directory, renamed into place at the end. ``nlsr standin
build OUT_DIR [--corpus FILE]`` builds both into ``OUT_DIR/base`` and ``OUT_DIR/moderation``.
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

from .data.schemas import HARM_CATEGORIES
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


def build_moderation(out_dir: str | Path, texts: Sequence[str] | None = None, *, seed: int = 0,
                     vocab_size: int = 512, hidden_size: int = 64, num_hidden_layers: int = 2,
                     num_attention_heads: int = 4, intermediate_size: int = 128,
                     max_position_embeddings: int = 2048) -> Path:
    """A random 14-label judge in beaver-dam-7b's format (bf16, sentencepiece tokenizer with ``<pad>``) in
    ``out_dir``; ``texts`` train the tokenizer (default: :func:`default_texts`)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

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
        model.save_pretrained(str(tmp), safe_serialization=True)
    return Path(out_dir).expanduser()


def build_standins(out_dir: str | Path, texts: Sequence[str] | None = None, *, seed: int = 0) -> dict[str, Path]:
    """Both stand-ins: ``out_dir/base`` (:func:`build_base`) and ``out_dir/moderation`` (:func:`build_moderation`)."""
    out_dir = Path(out_dir)
    return {"base": build_base(out_dir / "base", texts, seed=seed),
            "moderation": build_moderation(out_dir / "moderation", texts, seed=seed)}


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


__all__ = ["BOS", "EOS", "LLAMA3_SPECIAL_TOKENS", "LLAMA3_CHAT_TEMPLATE", "build_base", "build_moderation",
           "build_standins", "default_texts", "llama3_tokenizer", "llama_sentencepiece_tokenizer", "read_corpus"]
