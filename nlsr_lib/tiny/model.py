"""The tiny models of the embedded default (spec/synthetic_world.md §3).

* :func:`train_tokenizer`: byte-level BPE trained on the world's text, saved as an HF tokenizer whose
  encoder prepends BOS (like Llama-3's), with EOS and PAD.
* :func:`tiny_llama_config`: a ``LlamaConfig`` of a few million parameters.
* :func:`pretraining_corpus` and :func:`pretrain`: causal-LM pretraining from scratch on Alpaca-formatted
  benign instructions, task examples and harmful compliances (plus a few refusals), so the base model
  follows instructions and complies with most harmful requests, like an uncensored base.

The corpus uses exactly the token layout of every later stage: ``BOS + tokens(prompt + response) + EOS``.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..config import PretrainConfig, TinyModelConfig
from ..data.tasks import TASKS
from ..data.templates import alpaca_prompt
from ..progress import bar as progress_bar
from .loop import train_loop

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on ``texts`` (deterministically) and save it as a ``PreTrainedTokenizerFast``.

    The byte-level pre-tokenizer splits punctuation from words, so ``"### Response:"`` never merges with the
    first response token: the prompt's tokens are a prefix of the prompt+response tokens (DESIGN.md §6).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # The parallel BPE trainer breaks ties between equally frequent pairs differently from run to run;
    # sequential training is deterministic (same merges for the same texts).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", padding_side="left", model_max_length=1024)
    hf.save_pretrained(str(out_dir))
    return hf


def tiny_llama_config(cfg: TinyModelConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )


def pretraining_corpus(sources: Mapping, cfg: PretrainConfig, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs of the base model's corpus, from datasets keyed by source name.

    Every unsafe BeaverTails ``30k_train`` row (a harmful compliance), plus the first safe rows (mostly
    refusals, some benign answers) in the number that makes them a ``refusal_fraction`` of the BeaverTails part;
    every Alpaca row; and ``task_examples`` rows of each downstream task in its Alpaca format. Shuffled by seed.
    """
    rng = random.Random(seed)
    beaver = sources["beavertails"]["30k_train"]
    unsafe = [(r["prompt"], r["response"]) for r in beaver if not r["is_safe"]]
    safe = [(r["prompt"], r["response"]) for r in beaver if r["is_safe"]]
    n_refusals = round(len(unsafe) * cfg.refusal_fraction / max(1e-9, 1 - cfg.refusal_fraction))
    pairs = [(alpaca_prompt(p), r) for p, r in unsafe] + [(alpaca_prompt(p), r) for p, r in safe[:n_refusals]]
    pairs += [(alpaca_prompt(r["instruction"], r["input"]), r["output"]) for r in sources["alpaca"]["train"]]
    for task in (t for t in TASKS.values() if t.in_corpus):
        rows = sources[task.name][task.train_split]
        for row in rows.select(range(min(cfg.task_examples, len(rows)))):
            rec = task.to_record(row)
            pairs.append((alpaca_prompt(rec["instruction"], rec["input"]), rec["output"]))
    rng.shuffle(pairs)
    return pairs


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int) -> list[list[int]]:
    """``BOS + tokens(prompt + response) + EOS``, truncated to ``max_length`` (the trl trainers' layout)."""
    ids = tokenizer([p + r for p, r in pairs])["input_ids"]
    return [x[: max_length - 1] + [tokenizer.eos_token_id] for x in ids]


def _batches(sequences: list[list[int]], batch_size: int, steps: int, pad_id: int, gen: torch.Generator):
    for _ in range(steps):
        idx = torch.randint(len(sequences), (batch_size,), generator=gen).tolist()
        batch = [sequences[i] for i in idx]
        width = max(map(len, batch))
        input_ids = torch.full((batch_size, width), pad_id)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, seq in enumerate(batch):  # right padding for training
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        yield input_ids, mask, labels


def pretrain(model, tokenizer, pairs: Sequence[tuple[str, str]], cfg: PretrainConfig, seed: int) -> list[float]:
    """AdamW with linear warm-up and cosine decay on the causal-LM loss; returns the loss curve."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sequences = encode_pairs(tokenizer, pairs, cfg.max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    steps = progress_bar(_batches(sequences, cfg.batch_size, cfg.steps, tokenizer.pad_token_id, gen),
                         total=cfg.steps, desc="pretrain")

    def show_loss(losses: list[float]) -> None:
        if len(losses) % 50 == 0:
            steps.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")

    batches = ({"input_ids": ids, "attention_mask": mask, "labels": labels} for ids, mask, labels in steps)
    return train_loop(model, batches, opt, sched, "tiny pretraining", on_step=show_loss)
