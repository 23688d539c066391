"""Calibration batches for the region scorers (spec nlsr.md §2.5; DESIGN §6 "templates").

A calibration row is a builder record (``instruction``, optional ``input``, and ``output`` — or ``chosen`` and
``rejected`` for preference rows). Its tokens are exactly those of training (``nlsr_lib.train``: trl's
prompt-completion tokenization), so the scorers see the sequences the adapter was trained on:

* ``prompt = alpaca_prompt(instruction, input)``; ``ids = tokenizer(prompt + response + EOS)`` — the tokenizer
  adds BOS once, EOS closes the response (trl appends the EOS string to the completion);
* the prompt part is the common prefix of ``tokenizer(prompt)`` and ``ids`` (trl's ``common_prefix_length``);
  its labels are −100, the response tokens (EOS included) keep their ids as labels;
* sequences longer than ``max_length`` are cut at the end (trl's ``keep_start``); a row left without a response
  token is dropped.

This departs from the reference code on purpose (spec §9.13-9.14: prompt and response tokenised separately, no
EOS, no truncation), so that training, calibration and inference share one token layout.

Batches are right-padded (``attention_mask`` 0, labels −100 on padding): with a causal model and the default
position ids, right padding leaves every real token's activations unchanged. ``n`` rows are sampled with an
explicit ``torch.Generator(seed)`` (a random permutation, first ``n``; all rows if ``n`` ≥ the data size — the
reference code would index past the end, spec §9.13).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..data.templates import alpaca_prompt


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer, prompt: str, response: str, max_length: int | None = None,
                add_eos: bool = True) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one (prompt, response) as trl's SFT prompt-completion tokenization."""
    if add_eos and tokenizer.eos_token and not response.endswith(tokenizer.eos_token):
        response = response + tokenizer.eos_token
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + response)["input_ids"]
    n_prompt = common_prefix_length(prompt_ids, ids)
    if max_length is not None:
        ids = ids[:max_length]
    labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
    return {"input_ids": list(ids), "labels": labels}


def _prompt(row: Mapping[str, Any]) -> str:
    return alpaca_prompt(row["instruction"], row.get("input", "") or "")


def sample_rows(rows: Sequence, n: int, seed: int) -> list:
    """``n`` rows drawn without replacement by a seeded permutation (all rows, permuted, if ``n`` ≥ len)."""
    if n < 1:
        raise ValueError(f"calibration n must be >= 1, got {n}")
    if len(rows) == 0:
        raise ValueError("no calibration rows to sample from")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[:n]]


def pad_right(sequences: Sequence[dict[str, list[int]]], pad_token_id: int,
              prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-padded ``{prefix}input_ids``, ``{prefix}attention_mask``, ``{prefix}labels`` (−100 on padding)."""
    width = max(len(s["input_ids"]) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, s in enumerate(sequences):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(s["labels"])
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}


def _has_response(encoded: Mapping[str, list[int]]) -> bool:
    return any(label != -100 for label in encoded["labels"][1:])


def _chunks(items: list, size: int) -> Iterable[list]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start: start + size]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def calibration_batches(tokenizer, rows: Sequence[Mapping[str, Any]], *, n: int, seed: int = 42,
                        max_length: int = 1024, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Batches ``{input_ids, attention_mask, labels}`` of ``n`` sampled (instruction, output) rows."""
    encoded = [encode_pair(tokenizer, _prompt(r), r["output"], max_length) for r in sample_rows(rows, n, seed)]
    encoded = [e for e in encoded if _has_response(e)]
    if not encoded:
        raise ValueError(f"no calibration row keeps a response token within max_length = {max_length}")
    return [pad_right(chunk, _pad_id(tokenizer)) for chunk in _chunks(encoded, batch_size)]


def ordered_batches(tokenizer, rows: Sequence[Mapping[str, Any]], *, max_length: int = 1024,
                    batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of every (instruction, output) row in the given order (no sampling): the fixed
    calibration sets of the field's defences (Antidote, spec/defences.md §4)."""
    encoded = [encode_pair(tokenizer, _prompt(r), r["output"], max_length) for r in rows]
    if not encoded:
        raise ValueError("no calibration rows were given")
    return [pad_right(chunk, _pad_id(tokenizer)) for chunk in _chunks(encoded, batch_size)]


def preference_batches(tokenizer, rows: Sequence[Mapping[str, Any]], *, n: int, seed: int = 42,
                       max_length: int = 1024, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Batches ``{chosen_,rejected_}{input_ids, attention_mask, labels}`` of ``n`` sampled preference rows
    (chosen and rejected share the prompt; each is encoded as :func:`encode_pair`)."""
    pairs = []
    for r in sample_rows(rows, n, seed):
        prompt = _prompt(r)
        chosen = encode_pair(tokenizer, prompt, r["chosen"], max_length)
        rejected = encode_pair(tokenizer, prompt, r["rejected"], max_length)
        if _has_response(chosen) and _has_response(rejected):
            pairs.append((chosen, rejected))
    if not pairs:
        raise ValueError(f"no preference row keeps response tokens within max_length = {max_length}")
    pad = _pad_id(tokenizer)
    return [{**pad_right([c for c, _ in chunk], pad, "chosen_"), **pad_right([r for _, r in chunk], pad, "rejected_")}
            for chunk in _chunks(pairs, batch_size)]


def batches_hash(batches: Iterable[Mapping[str, torch.Tensor]]) -> str:
    """sha256 over every tensor of every batch (key, shape, values): the mask metadata's calibration hash."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key]
            if isinstance(t, torch.Tensor):
                h.update(key.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
