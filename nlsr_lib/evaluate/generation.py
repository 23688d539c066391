"""Batched greedy generation with the Hugging Face model (spec/nlsr.md §6.1, DESIGN.md §5).

Greedy decoding (``do_sample=False, num_beams=1``), ``max_new_tokens`` from params, EOS from the tokenizer, left
padding. The full sequence is decoded with ``skip_special_tokens`` and the response is cut out of it by
:func:`~nlsr_lib.data.templates.extract_response`. Three things make it fast without changing a response:

* **Batches by token budget.** Prompts are tokenized once, ordered longest-first (index breaks ties), and packed
  into batches whose padded size ``rows × (longest prompt + max_new_tokens)`` stays within ``token_budget``
  (and at most ``max_batch`` rows). Results come back in input order.
* **Stop at the cut.** A row stops as soon as :func:`~nlsr_lib.data.templates.response_complete` holds for its
  generated text (a second ``"### Response:"`` or a ``"!!!"``): every later token is discarded by the extraction
  anyway, and decoding is causal, so the response is the one a full-length run extracts. The batch ends when its
  last row stops (or hits EOS or ``max_new_tokens``).
* **No reload.** The model comes from the engine (:mod:`nlsr_lib.evaluate.engine`), which keeps it across calls.

Greedy outputs do not depend on the batch size on one machine (tests/test_generation_engine.py checks it on a
trained tiny model against the one-prompt-at-a-time run).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.templates import RESPONSE_MARKER, STOP_MARKER, extract_response, response_complete
from ..progress import bar

STOP_WINDOW = 24
"""Generated tokens decoded at each step to look for a cut marker (the markers are ≤ 13 ASCII characters, so one
completed by the newest token lies inside the last 13 tokens; a wider window is free)."""


def token_budget_batches(lengths: Sequence[int], max_new_tokens: int, token_budget: int,
                         max_batch: int) -> list[list[int]]:
    """Indices of prompts grouped into batches: longest-first (ties by index), each batch's padded size
    ``len(batch) × (its longest prompt + max_new_tokens) ≤ token_budget`` (a single over-long prompt is a batch of
    its own) and ``len(batch) ≤ max_batch``."""
    if token_budget < 1 or max_batch < 1:
        raise ValueError(f"token_budget and max_batch must be ≥ 1, got {token_budget} and {max_batch}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            width = lengths[batch[0]] + max_new_tokens  # the first is the longest
            if len(batch) < max_batch and (len(batch) + 1) * width <= token_budget:
                batch.append(i)
                continue
        batches.append([i])
    return batches


class StopAtResponseCut:
    """A ``transformers`` stopping criterion, per row: done once the extracted response is final. A row whose
    prompt already fixes it (:func:`response_complete`) is done at once; a row whose prompt holds the response
    marker is done when its newest tokens hold a cut marker (the last :data:`STOP_WINDOW` tokens are decoded at
    each step); a row whose prompt has no marker runs to EOS or ``max_new_tokens``. A done row stays done."""

    def __init__(self, tokenizer, prompts: Sequence[str], prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width
        self.done = torch.tensor([response_complete(p) for p in prompts])
        self.watch = [RESPONSE_MARKER in p for p in prompts]

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        window = input_ids[:, max(self.prompt_width, input_ids.shape[1] - STOP_WINDOW):]
        for row, text in enumerate(self.tokenizer.batch_decode(window, skip_special_tokens=True)):
            if self.watch[row] and (RESPONSE_MARKER in text or STOP_MARKER in text):
                self.done[row] = True
        return self.done.clone().to(input_ids.device)


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                       token_budget: int | None = None, stop_at_cut: bool = True,
                       desc: str = "generate") -> list[str]:
    """Greedy responses of ``model`` to fully formatted ``prompts`` (Alpaca strings), in input order.

    ``batch_size`` caps the rows of a batch; ``token_budget`` (padded prompt + new tokens, summed over rows) sizes
    it, ``None`` = ``batch_size`` rows of the longest prompt. ``stop_at_cut`` ends each row at its response's cut.
    """
    if not prompts:
        return []
    from transformers import StoppingCriteriaList

    encoded = tokenizer(list(prompts))["input_ids"]
    lengths = [len(ids) for ids in encoded]
    budget = token_budget or batch_size * (max(lengths) + max_new_tokens)
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    for idx in bar(token_budget_batches(lengths, max_new_tokens, budget, batch_size), desc=desc):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt").to(device)
        criteria = None
        if stop_at_cut:
            stop = StopAtResponseCut(tokenizer, [prompts[i] for i in idx], enc["input_ids"].shape[1])
            criteria = StoppingCriteriaList([stop])
        seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              stopping_criteria=criteria)
        for i, text in zip(idx, tokenizer.batch_decode(seqs, skip_special_tokens=True)):
            out[i] = extract_response(text)
    return out
