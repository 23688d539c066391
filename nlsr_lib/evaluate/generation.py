"""Batched greedy generation with the Hugging Face model (spec/nlsr.md §6.1, DESIGN.md §5).

Greedy decoding (argmax of the fp32 logits), ``max_new_tokens`` from params, EOS from the tokenizer, left
padding, position ids ``cumsum(mask) − 1``. The full sequence is decoded with ``skip_special_tokens`` and the
response is cut out of it by :func:`~nlsr_lib.data.templates.extract_response`. What makes it fast without changing
a response:

* **Batches by token budget.** Prompts are tokenized once, ordered longest-first (index breaks ties), and packed
  into batches whose padded size ``rows × (longest prompt + max_new_tokens)`` stays within ``token_budget``
  (and at most ``max_batch`` rows). Results come back in input order.
* **Stop at the cut.** A row stops as soon as :func:`~nlsr_lib.data.templates.response_complete` holds for its
  generated text (a second ``"### Response:"`` or a ``"!!!"``): every later token is discarded by the extraction
  anyway, and decoding is causal, so the response is the one a full-length run extracts.
* **The compacting decoder** (``compact``, the engine's; :func:`compact_decoder`): the prompts' shared leading
  tokens (the Alpaca header) are prefilled once; the KV cache is written in place (:func:`reserved_cache`) instead
  of concatenated at every step; a row that stopped (cut, EOS or length) leaves the batch and the cache once enough
  rows have (:data:`COMPACT_SHARE`), so later steps cost only the rows still running. ``transformers``'
  ``generate`` (decoder ``transformers``, the design before the engine) computes every row until the batch's last
  one stops.
* **No reload.** The model comes from the engine (:mod:`nlsr_lib.evaluate.engine`), which keeps it across calls.

Greedy outputs do not depend on the batch size or the decoder on one machine: tests/test_generation_engine.py checks
the decoders against each other and the one-prompt-at-a-time run of ``generate``; on the tiny study's cached
evaluations the compacting decoder reproduced every stored response it was run on (the closing note of issue 15).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch

from .. import names
from ..data.templates import RESPONSE_MARKER, STOP_MARKER, extract_response, response_complete
from ..progress import bar
from ..registry import Registry

STOP_WINDOW = 24
"""Generated tokens decoded at each step to look for a cut marker (the markers are ≤ 13 ASCII characters, so one
completed by the newest token lies inside the last 13 tokens; a wider window is free)."""

SHARED_PREFIX_MIN = 8
"""The compacting decoder prefills a batch's shared leading tokens once when there are at least this many."""

COMPACT_SHARE = 1 / 8
"""The compacting decoder drops finished rows once they are at least this share of the rows in the batch (each
drop copies the KV cache, so dropping one row at a time would cost a copy per step)."""


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


def cut_reached(tokenizer, windows: torch.Tensor) -> list[bool]:
    """Per row of ``windows`` (the newest generated tokens): whether they hold a cut marker."""
    return [RESPONSE_MARKER in text or STOP_MARKER in text
            for text in tokenizer.batch_decode(windows, skip_special_tokens=True)]


def stop_state(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, before any token: whether its response is already final (:func:`response_complete`), and
    whether its generated tokens are watched for a cut marker (the prompt holds the response marker)."""
    return (torch.tensor([response_complete(p) for p in prompts], dtype=torch.bool),
            torch.tensor([RESPONSE_MARKER in p for p in prompts], dtype=torch.bool))


class StopAtResponseCut:
    """A ``transformers`` stopping criterion, per row: done once the extracted response is final. A row whose
    prompt already fixes it (:func:`response_complete`) is done at once; a row whose prompt holds the response
    marker is done when its newest tokens hold a cut marker (the last :data:`STOP_WINDOW` tokens are decoded at
    each step); a row whose prompt has no marker runs to EOS or ``max_new_tokens``. A done row stays done."""

    def __init__(self, tokenizer, prompts: Sequence[str], prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width
        self.done, self.watch = stop_state(prompts)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        window = input_ids[:, max(self.prompt_width, input_ids.shape[1] - STOP_WINDOW):]
        for row, cut in enumerate(cut_reached(self.tokenizer, window)):
            if self.watch[row] and cut:
                self.done[row] = True
        return self.done.clone().to(input_ids.device)


Decoder = Callable[..., list[list[int]]]
"""``decoder(model, tokenizer, encoded, prompts, max_new_tokens, stop_at_cut)`` → per prompt of the batch (its
token ids ``encoded``, unpadded), its full token sequence: the left-padded prompt, then the generated tokens."""


def left_padded(tokenizer, encoded: Sequence[Sequence[int]], device) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    return tokenizer.pad({"input_ids": [list(ids) for ids in encoded]}, padding=True, return_tensors="pt").to(device)


def transformers_decoder(model, tokenizer, encoded: Sequence[Sequence[int]], prompts: Sequence[str],
                         max_new_tokens: int, stop_at_cut: bool) -> list[list[int]]:
    """``model.generate`` (greedy, one beam), with :class:`StopAtResponseCut` when ``stop_at_cut``."""
    from transformers import StoppingCriteriaList

    enc = left_padded(tokenizer, encoded, next(model.parameters()).device)
    criteria = None
    if stop_at_cut:
        criteria = StoppingCriteriaList([StopAtResponseCut(tokenizer, prompts, enc["input_ids"].shape[1])])
    seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          stopping_criteria=criteria)
    return seqs.tolist()


def _forward_model(model):
    """The module whose forward a decoding step calls (a PEFT model's underlying LoRA-wrapped model, as
    ``PeftModel.generate`` calls it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def reserved_cache(config, capacity: int):
    """A ``DynamicCache`` for ``config`` whose full-attention layers write into buffers of ``capacity`` positions
    (``ReservedLayer``, a class built on first use so that transformers is imported lazily) instead of
    concatenating a new tensor at every step."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    reserved = _reserved_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [reserved(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A full-attention cache layer over a buffer reserved once: ``update`` writes the new states in place and
        returns a view of the filled positions (the same values ``torch.cat`` would give, without copying the
        whole cache at every step)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.key_buffer = key_states.new_empty((*key_states.shape[:-2], self.capacity, key_states.shape[-1]))
            self.value_buffer = value_states.new_empty((*value_states.shape[:-2], self.capacity,
                                                        value_states.shape[-1]))

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise ValueError(f"the reserved KV cache holds {self.capacity} positions; {end} were asked for")
            self.key_buffer[..., self.length:end, :] = key_states
            self.value_buffer[..., self.length:end, :] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
            return self.keys, self.values

        def _rebuffer(self, select) -> None:
            if self.is_initialized:
                self.key_buffer, self.value_buffer = select(self.key_buffer), select(self.value_buffer)
                self.keys = self.key_buffer[..., :self.length, :]
                self.values = self.value_buffer[..., :self.length, :]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._rebuffer(lambda buffer: buffer[indices])

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._rebuffer(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    return ReservedLayer


def shared_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens every prompt of a batch shares, leaving each prompt at least one token of its
    own (the one whose logits start its response)."""
    shortest = min(len(ids) for ids in encoded)
    first = encoded[0]
    n = 0
    while n < shortest - 1 and all(ids[n] == first[n] for ids in encoded):
        n += 1
    return n


def compact_decoder(model, tokenizer, encoded: Sequence[Sequence[int]], prompts: Sequence[str],
                    max_new_tokens: int, stop_at_cut: bool) -> list[list[int]]:
    """Greedy decoding by hand with the step ``generate`` takes (the 2-D mask, or none where no row is padded;
    position ids ``cumsum(mask) − 1``; the newest token's logits in fp32; argmax; at least one token per row, as
    ``generate`` appends one before it checks a stopping criterion), with three savings that leave every row's
    computation as it was: the prompts' shared leading tokens (the Alpaca header) are prefilled once and their KV
    cache repeated over the rows (:data:`SHARED_PREFIX_MIN`); the cache is written in place
    (:func:`reserved_cache`); finished rows leave the batch and the cache (:data:`COMPACT_SHARE`)."""
    forward = _forward_model(model)
    device = next(model.parameters()).device
    rows = len(encoded)
    keep_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward.forward).parameters else {}
    cache = reserved_cache(forward.config, max(map(len, encoded)) + max_new_tokens)
    shared = shared_prefix_length(encoded) if rows > 1 else 0
    if shared < SHARED_PREFIX_MIN:
        shared = 0
    if shared:
        prefix = torch.tensor([list(encoded[0][:shared])], device=device)
        forward(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                position_ids=torch.arange(shared, device=device)[None], past_key_values=cache, use_cache=True,
                **keep_logits)
        cache.batch_repeat_interleave(rows)
    own = left_padded(tokenizer, [ids[shared:] for ids in encoded], device)
    mask = torch.cat([own["attention_mask"].new_ones((rows, shared)), own["attention_mask"]], dim=1)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, shared:]
    attention = None if bool((mask == 1).all()) else mask
    generated = torch.zeros((rows, max_new_tokens), dtype=torch.long)
    lengths = torch.zeros(rows, dtype=torch.long)
    done, watch = stop_state(prompts) if stop_at_cut else (torch.zeros(rows, dtype=torch.bool),) * 2
    live = torch.arange(rows)  # batch row -> input row
    step_input = {"input_ids": own["input_ids"], "attention_mask": attention, "position_ids": positions}
    for step in range(max_new_tokens):
        logits = forward(**step_input, past_key_values=cache, use_cache=True, **keep_logits).logits
        token = logits[:, -1].to(dtype=torch.float32).argmax(-1).cpu()
        running = ~done[live] if step else torch.ones(len(live), dtype=torch.bool)
        writing = live[running]
        generated[writing, step] = token[running]
        lengths[writing] = step + 1
        done[writing] |= token[running] == tokenizer.eos_token_id
        watched = writing[watch[writing] & ~done[writing]]
        if len(watched):
            window = generated[watched, max(0, step + 1 - STOP_WINDOW):step + 1]
            done[watched] |= torch.tensor(cut_reached(tokenizer, window), dtype=torch.bool)
        if bool(done.all()):
            break
        still = ~done[live]
        if int((~still).sum()) >= max(1, int(COMPACT_SHARE * len(live))):
            keep = still.nonzero().squeeze(1)
            live, token, keep = live[keep], token[keep], keep.to(device)
            cache.batch_select_indices(keep)
            positions = positions[keep]
            attention = None if attention is None else attention[keep]
        positions = positions[:, -1:] + 1
        if attention is not None:
            attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=-1)
        step_input = {"input_ids": token[:, None].to(device), "attention_mask": attention, "position_ids": positions}
    return [list(ids) + generated[r, :lengths[r]].tolist() for r, ids in enumerate(encoded)]


DECODERS: Registry[Decoder] = Registry(names.DECODERS)
DECODERS.register("compact", compact_decoder)
DECODERS.register("transformers", transformers_decoder)


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                       token_budget: int | None = None, stop_at_cut: bool = True, decoder: str = "compact",
                       desc: str = "generate") -> list[str]:
    """Greedy responses of ``model`` to fully formatted ``prompts`` (Alpaca strings), in input order.

    ``batch_size`` caps the rows of a batch; ``token_budget`` (padded prompt + new tokens, summed over rows) sizes
    it, ``None`` = ``batch_size`` rows of the longest prompt. ``stop_at_cut`` ends each row at its response's cut;
    ``decoder``: ``compact`` (finished rows leave the batch) or ``transformers`` (``model.generate``).
    """
    if not prompts:
        return []
    decode = DECODERS[decoder]
    encoded = tokenizer(list(prompts))["input_ids"]
    lengths = [len(ids) for ids in encoded]
    budget = token_budget or batch_size * (max(lengths) + max_new_tokens)
    out: list[str] = [""] * len(prompts)
    for idx in bar(token_budget_batches(lengths, max_new_tokens, budget, batch_size), desc=desc):
        seqs = decode(model, tokenizer, [encoded[i] for i in idx], [prompts[i] for i in idx], max_new_tokens,
                      stop_at_cut)
        for i, text in zip(idx, tokenizer.batch_decode(seqs, skip_special_tokens=True)):
            out[i] = extract_response(text)
    return out
