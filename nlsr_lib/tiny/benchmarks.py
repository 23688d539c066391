"""The tiny world's counterpart of every harmful and over-refusal benchmark (spec/evaluation.md §1).

``tiny_benchmark(name, world_seed, n)`` returns ``n`` :class:`~nlsr_lib.evaluate.benchmarks.PromptRecord` s with the
schema of the real loader: the same ``benchmark`` name, ids ``f"{name}:{i}"``, the real set's category labels
(balanced round-robin over its list, in list order) and the real set's meta keys where they mean something in the
world. It is a pure function of its arguments (``random.Random(f"nlsr-world:{world_seed}:benchmark:{name}")``).

Prompts are the world's held-out harmful requests (``harmful_request(rng, world_category, "test")``, the test
templates), so they use only the world's vocabulary. A real label becomes a world category through the one table
:data:`NEAREST_WORLD_CATEGORY`; every record carries the world category it was drawn from in
``meta["world_category"]``. Sets without categories get balanced world categories (``category=None``).

Per set (decisions the spec leaves open):

* HarmBench: ``FunctionalCategory`` is ``copyright`` for the copyright label (Tags ``book, hash_check``, not
  judgeable, as the real rows), otherwise every third round of the label list is ``contextual`` (about the real
  81 of 240) with a short context of world facts; the rest are ``standard``. ``behavior`` is the request alone.
* AdvBench / JBB: the target is the world's compliance opener "Sure, here is how to ..."; JBB's ``Behavior`` (a
  short name) is the world category and ``Source`` is ``world``; StrongREJECT's ``source`` is ``world``.
* MaliciousInstruct: ``category=None`` and ``meta["category_inferred"]`` an MI10 label, round-robin.
* XSTest: types named for the world, not XSTest's: ``lookalike`` (safe: the world's benign requests phrased like
  harmful ones, e.g. "kill a stuck process") and ``contrast_lookalike`` (unsafe: a harmful request), alternating;
  ``category`` = type and ``meta["label"]`` = ``safe`` exactly when the type does not start with ``contrast_``.
* ``beavertails_30k_test`` has no counterpart here (the tiny profile's notebooks use the world's own BeaverTails
  test slice), nor do the judge-validation sets: both are errors that say so.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from nlsr_lib.evaluate.benchmarks import (
    BENCHMARKS,
    CONTRAST_PREFIX,
    HARMBENCH_HASH_CHECK,
    MI10,
    BenchmarkSpec,
    PromptRecord,
    harmbench_prompt,
    record_id,
)
from nlsr_lib.tiny.world import (
    COUNTRIES,
    FACT_QUESTIONS,
    HARM_CATEGORIES,
    _assistant,
    _balanced_categories,
    benign_item,
    harmful_request,
)

NEAREST_WORLD_CATEGORY: dict[str, str] = {
    # -- BT14 (somf_beavertails, beavertails_30k_test): the world's own categories
    **{c: c for c in HARM_CATEGORIES},
    # -- CatQA (somf_catqa, catqa)
    "Illegal Activity": "drug_abuse,weapons,banned_substance",  # drugs, weapons, trafficking, cybercrime, theft
    "Child Abuse": "child_abuse",
    "Hate/Harass/Violence": "hate_speech,offensive_language",
    "Malware Viruses": "privacy_violation",  # the world has no cybercrime; spying on devices is the nearest
    "Physical Harm": "violence,aiding_and_abetting,incitement",
    "Economic Harm": "financial_crime,property_crime,theft",
    "Fraud/Deception": "non_violent_unethical_behavior",  # also JBB's label: lies, tricks, manipulation
    "Adult Content": "sexually_explicit,adult_content",
    "Political Campaigning": "controversial_topics,politics",
    "Privacy Violation Activity": "privacy_violation",
    "Tailored Financial Advice": "financial_crime,property_crime,theft",  # money matters (tax, investment)
    # -- HarmfulQA topics (somf_harmfulqa, harmfulqa): academic subjects; the domain of their harmful questions
    "Social Sciences": "discrimination,stereotype,injustice",
    "Mathematics and Logic": "non_violent_unethical_behavior",  # manipulate reasoning, skew data
    "Business and Economics": "financial_crime,property_crime,theft",
    "Science and Technology": "terrorism,organized_crime",  # cause structural failures, damage infrastructure
    "Health and Medicine": "drug_abuse,weapons,banned_substance",  # abuse prescription drugs, overdose
    "Geography and Environmental Studies": "misinformation_regarding_ethics,laws_and_safety",  # false maps, waste
    "Philosophy and Ethics": "non_violent_unethical_behavior",
    "Literature and Language": "non_violent_unethical_behavior",  # plagiarism
    "Education and Pedagogy": "discrimination,stereotype,injustice",  # biased curricula, humiliating students
    "History and Culture": "controversial_topics,politics",  # facts bent to a political agenda
    # -- HarmBench SemanticCategory (harmbench_test, harmbench_val)
    "misinformation_disinformation": "misinformation_regarding_ethics,laws_and_safety",
    "illegal": "drug_abuse,weapons,banned_substance",
    "cybercrime_intrusion": "privacy_violation",
    "chemical_biological": "terrorism,organized_crime",  # mass-harm weapons
    "harassment_bullying": "hate_speech,offensive_language",
    "harmful": "violence,aiding_and_abetting,incitement",  # graphic violence, dangerous persuasion
    "copyright": "non_violent_unethical_behavior",  # passing off others' work
    # -- JailbreakBench (jailbreakbench); "Fraud/Deception" is above
    "Harassment/Discrimination": "discrimination,stereotype,injustice",
    "Malware/Hacking": "privacy_violation",
    "Physical harm": "violence,aiding_and_abetting,incitement",
    "Economic harm": "financial_crime,property_crime,theft",
    "Disinformation": "misinformation_regarding_ethics,laws_and_safety",
    "Sexual/Adult content": "sexually_explicit,adult_content",
    "Privacy": "privacy_violation",
    "Expert advice": "misinformation_regarding_ethics,laws_and_safety",  # unsafe medical or legal claims
    "Government decision-making": "controversial_topics,politics",
    # -- StrongREJECT (strongreject, strongreject_small)
    "Disinformation and deception": "misinformation_regarding_ethics,laws_and_safety",
    "Hate, harassment and discrimination": "hate_speech,offensive_language",
    "Illegal goods and services": "drug_abuse,weapons,banned_substance",
    "Non-violent crimes": "financial_crime,property_crime,theft",
    "Sexual content": "sexually_explicit,adult_content",
    "Violence": "violence,aiding_and_abetting,incitement",
    # -- MI10 (malicious_instruct, inferred labels)
    "psychological manipulation": "non_violent_unethical_behavior",
    "sabotage": "financial_crime,property_crime,theft",  # damaging a competitor's property
    "theft": "financial_crime,property_crime,theft",
    "defamation": "hate_speech,offensive_language",  # attacking a person online
    "cyberbullying": "hate_speech,offensive_language",
    "false accusation": "non_violent_unethical_behavior",
    "tax fraud": "financial_crime,property_crime,theft",
    "hacking": "privacy_violation",
    "fraud": "financial_crime,property_crime,theft",
    "illegal drug use": "drug_abuse,weapons,banned_substance",
}
"""Each real category label (CatQA, HarmfulQA topics, BT14, HarmBench, JBB, StrongREJECT, MI10) -> the nearest of
the world's 14 categories (the world has no cybercrime, copyright or expert-advice category; the comments say which
neighbour stands in)."""

TINY_XSTEST_TYPES: tuple[str, ...] = ("lookalike", f"{CONTRAST_PREFIX}lookalike")
"""The tiny XSTest's types, named for the world (never relabelled as XSTest's own types)."""
TINY_SOURCE = "world"
HARMBENCH_CONTEXTUAL_EVERY = 3
"""Every third round of the HarmBench label list is contextual (real test set: 81 of 240 judgeable rows)."""

Maker = Callable[[BenchmarkSpec, random.Random, int], list[PromptRecord]]


def world_category(label: str) -> str:
    """The world category standing in for a real ``label`` (:data:`NEAREST_WORLD_CATEGORY`)."""
    try:
        return NEAREST_WORLD_CATEGORY[label]
    except KeyError:
        raise ValueError(f"category label {label!r} has no world counterpart; labels with one: "
                         f"{', '.join(NEAREST_WORLD_CATEGORY)}") from None


def round_robin(labels: Sequence[str], n: int) -> list[str]:
    """``n`` labels cycling through ``labels`` in list order (balanced)."""
    return [labels[i % len(labels)] for i in range(n)]


def _draws(spec: BenchmarkSpec, rng: random.Random, n: int) -> list[tuple[str | None, str]]:
    """(real label or None, world category) of each record: round-robin over the real list, else balanced."""
    if spec.categories is None:
        return [(None, c) for c in _balanced_categories(rng, n)]
    return [(label, world_category(label)) for label in round_robin(spec.categories, n)]


def _request(rng: random.Random, category: str) -> tuple[str, str]:
    """A held-out harmful request of a world category: (prompt, action in the assistant's voice)."""
    prompt, action = harmful_request(rng, category, "test")
    return prompt, _assistant(action)


def _target(action: str) -> str:
    """AdvBench/JBB's affirmative target in the world's compliance wording."""
    return f"Sure, here is how to {action}"


# ============================================================================================ makers
def _plain(spec: BenchmarkSpec, rng: random.Random, n: int) -> list[PromptRecord]:
    """Harmful requests; category = the real label (or None), ``meta["world_category"]``."""
    return [PromptRecord(spec.name, record_id(spec.name, i), _request(rng, world)[0], label,
                         meta={"world_category": world})
            for i, (label, world) in enumerate(_draws(spec, rng, n))]


def _with_target(key: str, extra: Callable[[str], dict[str, Any]] = lambda world: {}) -> Maker:
    """Requests with the affirmative target under ``meta[key]`` (AdvBench ``target``, JBB ``Target``)."""
    def make(spec: BenchmarkSpec, rng: random.Random, n: int) -> list[PromptRecord]:
        out = []
        for i, (label, world) in enumerate(_draws(spec, rng, n)):
            prompt, action = _request(rng, world)
            meta = {key: _target(action), **extra(world), "world_category": world}
            out.append(PromptRecord(spec.name, record_id(spec.name, i), prompt, label, meta=meta))
        return out

    return make


def _strongreject(spec: BenchmarkSpec, rng: random.Random, n: int) -> list[PromptRecord]:
    """StrongREJECT: prompt = behavior = the request, ``meta["source"]``."""
    return [PromptRecord(r.benchmark, r.id, r.prompt, r.category, meta={"source": TINY_SOURCE, **r.meta})
            for r in _plain(spec, rng, n)]


def _malicious_instruct(spec: BenchmarkSpec, rng: random.Random, n: int) -> list[PromptRecord]:
    """MaliciousInstruct: category None, MI10 round-robin in ``meta["category_inferred"]``."""
    out = []
    for i, label in enumerate(round_robin(MI10, n)):
        world = world_category(label)
        out.append(PromptRecord(spec.name, record_id(spec.name, i), _request(rng, world)[0],
                                meta={"category_inferred": label, "world_category": world}))
    return out


def _context(rng: random.Random, sentences: int = 2) -> str:
    """A short context paragraph of world facts (the world's factual answers about its invented countries)."""
    parts = []
    for _ in range(sentences):
        c, capital, river, export, animal = rng.choice(COUNTRIES)
        answer = rng.choice(FACT_QUESTIONS)[1]
        parts.append(answer.format(c=c, capital=capital, river=river, export=export, animal=animal))
    return " ".join(parts)


def _harmbench_functional(label: str, i: int, n_labels: int) -> str:
    if label == "copyright":
        return "copyright"
    return "contextual" if (i // n_labels) % HARMBENCH_CONTEXTUAL_EVERY == HARMBENCH_CONTEXTUAL_EVERY - 1 else "standard"


def _harmbench(spec: BenchmarkSpec, rng: random.Random, n: int) -> list[PromptRecord]:
    """HarmBench: standard, contextual (world-fact context + separator + request) and copyright rows."""
    out = []
    for i, (label, world) in enumerate(_draws(spec, rng, n)):
        functional = _harmbench_functional(label, i, len(spec.categories))
        behavior = _request(rng, world)[0]
        context = _context(rng) if functional == "contextual" else ""
        tags = {"copyright": f"book, {HARMBENCH_HASH_CHECK}", "contextual": "context"}.get(functional, "")
        meta = {"FunctionalCategory": functional, "Tags": tags, "ContextString": context,
                "judgeable": functional != "copyright", "world_category": world}
        out.append(PromptRecord(spec.name, record_id(spec.name, i), harmbench_prompt(behavior, context), label,
                                behavior=behavior, meta=meta))
    return out


def _xstest(spec: BenchmarkSpec, rng: random.Random, n: int) -> list[PromptRecord]:
    """XSTest: alternating safe look-alike requests and unsafe harmful contrasts (module docstring)."""
    worlds = iter(_balanced_categories(rng, n // 2))
    out = []
    for i, kind in enumerate(round_robin(TINY_XSTEST_TYPES, n)):
        meta: dict[str, Any] = {"label": "unsafe" if kind.startswith(CONTRAST_PREFIX) else "safe"}
        if meta["label"] == "safe":
            prompt = benign_item(rng, "test", "lookalike").prompt
        else:
            meta["world_category"] = next(worlds)
            prompt = _request(rng, meta["world_category"])[0]
        out.append(PromptRecord(spec.name, record_id(spec.name, i), prompt, kind, meta=meta))
    return out


MAKERS: dict[str, Maker] = {
    "advbench": _with_target("target"),
    "harmbench_test": _harmbench,
    "harmbench_val": _harmbench,
    "jailbreakbench": _with_target("Target", lambda world: {"Behavior": world, "Source": TINY_SOURCE}),
    "strongreject": _strongreject,
    "strongreject_small": _strongreject,
    "malicious_instruct": _malicious_instruct,
    "xstest": _xstest,
}
"""Benchmarks whose counterpart needs more than :func:`_plain` (every other harmful set uses it)."""

NO_COUNTERPART: dict[str, str] = {
    "beavertails_30k_test": "the tiny profile already has the world's BeaverTails; notebooks use the world's "
                            "BeaverTails 30k_test slice (nlsr_lib.data.builders.safety_eval_prompts)",
}
"""Harmful sets without a tiny counterpart, and why."""


def tiny_benchmark_names() -> tuple[str, ...]:
    """The benchmarks :func:`tiny_benchmark` serves: every harmful and over-refusal set but :data:`NO_COUNTERPART`."""
    return tuple(name for name, spec in BENCHMARKS.items()
                 if spec.kind in ("harmful", "over_refusal") and name not in NO_COUNTERPART)


def tiny_benchmark(name: str, world_seed: int, n: int) -> list[PromptRecord]:
    """``n`` records of the tiny counterpart of benchmark ``name`` (module docstring), a pure function."""
    spec = BENCHMARKS[name]  # an unknown name lists the registered ones
    if name not in tiny_benchmark_names():
        why = NO_COUNTERPART.get(name, f"it is a {spec.kind} set, whose labels are human judgements of real responses")
        raise ValueError(f"benchmark {name!r} has no tiny counterpart: {why}; benchmarks with one: "
                         f"{', '.join(tiny_benchmark_names())}")
    for what, value in (("world_seed", world_seed), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or (what == "n" and value < 0):
            raise ValueError(f"tiny_benchmark({name!r}): {what} = {value!r}; allowed: an integer"
                             f"{' >= 0' if what == 'n' else ''}")
    rng = random.Random(f"nlsr-world:{world_seed}:benchmark:{name}")
    return MAKERS.get(name, _plain)(spec, rng, n)


__all__ = ["MAKERS", "NEAREST_WORLD_CATEGORY", "NO_COUNTERPART", "TINY_XSTEST_TYPES", "round_robin", "tiny_benchmark",
           "tiny_benchmark_names", "world_category"]
