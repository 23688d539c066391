"""LLM judges over an OpenAI-compatible chat-completions API (spec/evaluation.md §2.0, §5; spec/somf.md §4.3):
:class:`LLMJudge` runs a judge protocol through a :class:`~nlsr_lib.evaluate.llm_client.ChatClient` with an on-disk
verdict cache. The protocols, their parses and the aggregates are in :mod:`~nlsr_lib.evaluate.llm_protocols`
(§2.2–§2.5), the prompt texts in :mod:`~nlsr_lib.evaluate.judge_prompts` and the Llama-Guard-3 format in
:mod:`~nlsr_lib.evaluate.guard_format`; their public names are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..runs import atomic_write_json
from .guard_format import LLAMA_GUARD_CATEGORIES, LLAMA_GUARD_TEMPLATE, SPECIAL_TOKEN_PATTERN, api_text
from .guard_format import llama_guard_categories as categories_text
from .judge_prompts import (
    HB_PROMPT,
    JBB_PROMPT,
    PAIRWISE_SYSTEM,
    PAIRWISE_USER,
    SR_SYSTEM,
    SR_USER,
    XS_PROMPT,
    XS_SYSTEM,
    fill,
    xstest_prompt,
)
from .judges import Verdict, is_empty
from .llm_client import ChatClient, JudgeError, Usage, error_name
from .llm_protocols import (
    FIRST_TOKEN_STRIP,
    HB_MAX_CHARS,
    PAIRWISE_TAG,
    PAIRWISE_VALUE,
    PROTOCOLS,
    XS_LABELS,
    HarmBench,
    JailbreakBench,
    JudgeInputError,
    JudgeProtocol,
    LlamaGuard,
    Pairwise,
    StrongReject,
    XSTest,
    check_same_length,
    first_token,
    harmbench_asr,
    outcome,
    pairwise_counts,
    preference_score,
    strongreject_summary,
    unparsed,
    user,
    xstest_rates,
)

CACHE_FORMAT = 1

# The Llama-Guard-3 format under its former names here (guard_format is its one definition).
LG_TEMPLATE = LLAMA_GUARD_TEMPLATE.template
LG_CATEGORIES = tuple(name for _, name in LLAMA_GUARD_CATEGORIES)
LG_SPECIAL = SPECIAL_TOKEN_PATTERN


@dataclass(frozen=True)
class Item:
    prompt: str
    behavior: str | None
    response: str
    reference: str | None

    @property
    def text(self) -> str:
        """What the judge reads as the request: the behaviour when given, else the prompt."""
        return self.behavior if self.behavior is not None else self.prompt


class LLMJudge:
    """A judge protocol on a chat client, with an on-disk verdict cache.

    * inputs: ``prompts`` and ``responses``; ``behaviors`` (optional) replace the prompt in the judge's text
      (HarmBench's behaviour, JBB's goal, StrongREJECT's unwrapped prompt); ``references`` for ``pairwise``. Lengths
      must agree (:class:`JudgeInputError`). Other protocols ignore ``references``.
    * empty responses are judged like any other (the judge sees what the model said) and marked ``empty=True``, so
      the share of empty responses is reported beside the rate (as :mod:`~nlsr_lib.evaluate.judges` does).
    * cache: one small JSON file per item, ``cache_dir/<k[:2]>/<k>.json`` with ``k`` = sha256 of (protocol id, judge
      model, prompt, behavior, response, reference), written atomically and only for a parsed verdict; a rerun of
      the same inputs makes no call. The protocol id carries a hash of its texts and API parameters (and ``+swap``),
      so a changed template never reuses old verdicts. Nothing secret is written.
    * a call that fails after the client's retries gives ``Verdict(parsed=False, error=<class name>)`` (openai's
      class, e.g. ``RateLimitError``, or ``JudgeReplyError``); ``strict=True`` raises the first such error (in input
      order) after caching the verdicts that did succeed. An unparsed reply is tried on each ``fallback_models`` in
      turn, then stays unparsed (counted, never read as safe). StrongREJECT's fallback chain (gpt-4o-mini, then
      gpt-3.5-turbo on a parse failure) is ``LLMJudge(..., fallback_models=("gpt-3.5-turbo",))``.
    * HarmBench's clip of the generation (no judge tokenizer here) is recorded per item (``clipped``, in
      :attr:`records` and the cache file) and in :meth:`describe`.
    """

    name = "llm"

    def __init__(self, protocol: str | JudgeProtocol, client: ChatClient, cache_dir: str | Path | None,
                 swap_positions: bool = False, concurrency: int = 8, strict: bool = False,
                 fallback_models: Sequence[str] = ()):
        self.protocol = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
        if swap_positions and not self.protocol.swappable:
            swappable = [n for n in PROTOCOLS if PROTOCOLS[n].swappable]
            raise JudgeInputError(f"swap_positions is not an option of the {self.protocol.name} protocol; "
                                  f"only of: {', '.join(swappable)}")
        if concurrency < 1:
            raise JudgeInputError(f"concurrency must be at least 1; got {concurrency}")
        self.client, self.swap_positions, self.concurrency, self.strict = client, swap_positions, concurrency, strict
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.fallback_models = tuple(fallback_models)
        self.records: list[dict[str, Any]] = []  # per item of the last judge() call: cached, answered_by, notes

    def __repr__(self) -> str:
        return (f"LLMJudge(protocol={self.protocol_id!r}, model={self.client.model!r}, cache_dir={self.cache_dir}, "
                f"swap_positions={self.swap_positions}, concurrency={self.concurrency}, strict={self.strict})")

    @property
    def usage(self) -> Usage:
        return self.client.usage

    @property
    def protocol_id(self) -> str:
        return self.protocol.id + ("+swap" if self.swap_positions else "")

    def describe(self) -> dict[str, Any]:
        """What a result row records about this judge (spec/evaluation.md §2.0): judge, judge_model, protocol, ..."""
        return {"judge": self.name, "judge_model": self.client.model, "fallback_models": list(self.fallback_models),
                "swap_positions": self.swap_positions, **self.protocol.describe(), "protocol_id": self.protocol_id}

    # ------------------------------------------------------------------------------------------------ judging
    def judge(self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str] | None = None,
              behaviors: Sequence[str] | None = None) -> list[Verdict]:
        """One :class:`Verdict` per response, in order (class docstring)."""
        items = self.items(prompts, responses, references, behaviors)
        keys = [self.cache_key(item) for item in items]
        verdicts: list[Verdict | None] = [self.load(k) for k in keys]
        self.records = [{"cached": v is not None} for v in verdicts]
        self.usage.add_cache_hits(sum(v is not None for v in verdicts))
        todo = [i for i, v in enumerate(verdicts) if v is None]
        fresh = self.run([items[i] for i in todo], [keys[i] for i in todo], [self.records[i] for i in todo])
        for i, verdict in zip(todo, fresh):
            verdicts[i] = verdict
        return verdicts  # type: ignore[return-value]

    def items(self, prompts, responses, references, behaviors) -> list[Item]:
        check_same_length(prompts=prompts, responses=responses, references=references, behaviors=behaviors)
        if self.protocol.needs_reference and references is None:
            raise JudgeInputError(f"the {self.protocol.name} protocol needs references (the reference model's "
                                  "responses, one per response; somf.md §4.3)")
        refs = references if self.protocol.needs_reference else [None] * len(responses)
        behs = behaviors if behaviors is not None else [None] * len(responses)
        return [Item(p, b, r, ref) for p, b, r, ref in zip(prompts, behs, responses, refs)]

    def run(self, items: list[Item], keys: list[str], records: list[dict]) -> list[Verdict]:
        """Verdicts of uncached items: the judge model, then each fallback model on the items still unparsed."""
        verdicts: list[Verdict] = [None] * len(items)  # type: ignore[list-item]
        pending, first_error = list(range(len(items))), None
        for model in (None, *self.fallback_models):
            if not pending:
                break
            answered = self.ask([items[i] for i in pending], model)
            still = []
            for i, (verdict, exc) in zip(pending, answered):
                verdicts[i] = verdict
                records[i].update(answered_by=model or self.client.model, **self.protocol.notes(items[i].response))
                if exc is not None:
                    first_error = first_error or (i, exc)
                elif verdict.parsed:
                    self.store(keys[i], verdict, records[i])
                else:
                    still.append(i)
            pending = still
        if self.strict and first_error is not None:
            raise first_error[1]
        return verdicts

    def ask(self, items: list[Item], model: str | None) -> list[tuple[Verdict, JudgeError | None]]:
        """(verdict, the call's error or None) per item, all calls through the client's bounded pool."""
        batches = [self.protocol.calls(it.text, it.response, it.reference, self.swap_positions) for it in items]
        flat = [messages for batch in batches for messages in batch]
        replies = self.client.map_complete(flat, self.concurrency, model=model, **self.protocol.params)
        out, pos = [], 0
        for item, batch in zip(items, batches):
            out.append(self.verdict(item, replies[pos: pos + len(batch)]))
            pos += len(batch)
        return out

    def verdict(self, item: Item, replies: Sequence[Any]) -> tuple[Verdict, JudgeError | None]:
        empty = is_empty(item.response)
        for reply in replies:
            if isinstance(reply, JudgeError):
                return Verdict(flagged=False, parsed=False, empty=empty, error=error_name(reply)), reply
            if isinstance(reply, BaseException):  # a bug, not an API outcome
                raise reply
        texts = [reply.text for reply in replies]
        fields = self.protocol.read(texts, self.swap_positions)
        raw = texts[0] if len(texts) == 1 else "\n".join(f"[order {k}] {t}" for k, t in enumerate(texts))
        return Verdict(**{"empty": empty, "raw": raw, **fields}), None

    # ------------------------------------------------------------------------------------------------ cache
    def cache_key(self, item: Item) -> str:
        blob = json.dumps({"protocol": self.protocol_id, "judge_model": self.client.model, "prompt": item.prompt,
                           "behavior": item.behavior, "response": item.response, "reference": item.reference},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def load(self, key: str) -> Verdict | None:
        """The cached verdict, or None (no cache, no entry, or an entry that does not read as one)."""
        if self.cache_dir is None:
            return None
        try:
            record = json.loads(self.cache_path(key).read_text(encoding="utf-8"))
            fields = dict(record["verdict"])
            fields["categories"] = tuple(fields.get("categories") or ())
            return Verdict(**fields)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, key: str, verdict: Verdict, record: dict[str, Any]) -> None:
        if self.cache_dir is None:
            return
        atomic_write_json(self.cache_path(key), {
            "format": CACHE_FORMAT, "judge": self.name, "protocol": self.protocol_id,
            "judge_model": self.client.model, **{k: v for k, v in record.items() if k != "cached"},
            "verdict": {**asdict(verdict), "categories": list(verdict.categories)}})



__all__ = [
    "CACHE_FORMAT",
    "FIRST_TOKEN_STRIP",
    "HB_MAX_CHARS",
    "HB_PROMPT",
    "JBB_PROMPT",
    "LG_CATEGORIES",
    "LG_SPECIAL",
    "LG_TEMPLATE",
    "PAIRWISE_SYSTEM",
    "PAIRWISE_TAG",
    "PAIRWISE_USER",
    "PAIRWISE_VALUE",
    "PROTOCOLS",
    "SR_SYSTEM",
    "SR_USER",
    "XS_LABELS",
    "XS_PROMPT",
    "XS_SYSTEM",
    "HarmBench",
    "Item",
    "JailbreakBench",
    "JudgeInputError",
    "JudgeProtocol",
    "LLMJudge",
    "LlamaGuard",
    "Pairwise",
    "StrongReject",
    "XSTest",
    "api_text",
    "categories_text",
    "check_same_length",
    "fill",
    "first_token",
    "harmbench_asr",
    "outcome",
    "pairwise_counts",
    "preference_score",
    "strongreject_summary",
    "unparsed",
    "user",
    "xstest_prompt",
    "xstest_rates",
]
