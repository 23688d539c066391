"""Batched greedy generation (spec/nlsr.md §6.1).

Left padding, greedy decoding (``do_sample=False, num_beams=1``), ``max_new_tokens`` from params, EOS from
the tokenizer. The full sequence is decoded with ``skip_special_tokens`` and the response is the text after
the first ``"### Response:"`` (and before a second one), stripped and cut at the first ``"!!!"``.
Prompts are processed longest-first so batches pad little; results come back in input order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from ..data.templates import extract_response
from ..progress import bar


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                       desc: str = "generate") -> list[str]:
    """Greedy responses of ``model`` to fully formatted ``prompts`` (Alpaca strings), in input order."""
    if not prompts:
        return []
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    for start in bar(range(0, len(order), batch_size), desc=desc):
        idx = order[start: start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for i, text in zip(idx, tokenizer.batch_decode(seqs, skip_special_tokens=True)):
            out[i] = extract_response(text)
    return out
