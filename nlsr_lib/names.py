"""The names params may choose, for the registry families whose modules import torch (DESIGN.md §7).

config.py validates params against these without importing the families' modules (``import nlsr_lib.config``
stays light: no torch, no transformers). Each family's :class:`~nlsr_lib.registry.Registry` is created from its
entry here and refuses to register a name that is not declared, so a new method is its function, its registry
line and its name here; ``tests/test_registry.py`` checks that every declared name is registered, in this order
(the registration order, which is also the order of the notebooks' loops).

Families whose module is light are validated against their registry directly: the downstream tasks
(:data:`nlsr_lib.data.tasks.TASKS`).
"""

from __future__ import annotations

from .registry import Names

#: nlsr_lib.train.alignment.ALIGNMENT_METHODS
ALIGNMENT_METHODS = Names("alignment method", "sft", "dpo", "orpo", "kto", "simpo")
#: nlsr_lib.regions.registry.SCORERS (registered by regions/wanda, snip, control, lowrank, in that order)
REGION_SCORERS = Names("region scorer", "wanda", "wanda_set_difference", "snip", "preference_snip",
                       "snip_set_difference", "random", "low_rank")
#: nlsr_lib.fusion.operators.MERGE_METHODS
MERGE_METHODS = Names("merge method", "weight_averaging", "task_arithmetic", "ties", "dare", "consensus_ta",
                      "consensus_ties")
#: nlsr_lib.restore.defences.DEFENCES
DEFENCES = Names("defence", "none", "nlsr", "random_mask", "safelora", "resta", "aligned_adapter")
#: nlsr_lib.stages.field_defences.FIELD_DEFENCES: the defences of the field beside NLSR (spec/defences.md)
FIELD_DEFENCES = Names("field defence", "vaccine", "booster", "lisa", "safety_mixing", "constrained_sft", "antidote")
#: nlsr_lib.restore.selection.STRATEGIES
RESTORE_STRATEGIES = Names("selection strategy", "adaptive", "threshold", "layers", "all")
#: nlsr_lib.restore.similarity.SIMILARITIES
SIMILARITIES = Names("similarity", "gram", "explicit")
#: nlsr_lib.restore.correction.CORRECTIONS
CORRECTIONS = Names("correction", "neuron", "module")
#: nlsr_lib.evaluate.engine.ENGINES
GENERATION_BACKENDS = Names("generation backend", "hf", "vllm")
#: nlsr_lib.evaluate.generation.DECODERS (the hf backend's decoding loop)
DECODERS = Names("decoder", "compact", "transformers")
#: nlsr_lib.evaluate.judges.JUDGES
JUDGES = Names("judge", "moderation", "keyword", "llm", "llama_guard")
#: nlsr_lib.evaluate.benchmarks.BENCHMARKS (spec/evaluation.md §1.2; the tiny world has a counterpart of each
#: harmful and over-refusal set: nlsr_lib.tiny.benchmarks)
BENCHMARKS = Names("benchmark", "somf_catqa", "somf_beavertails", "somf_shadow", "somf_harmfulqa", "somf_dangerousqa",
                   "catqa", "harmfulqa", "adversarialqa", "dangerousqa", "advbench", "harmbench_test", "harmbench_val",
                   "jailbreakbench", "strongreject", "strongreject_small", "malicious_instruct", "xstest",
                   "beavertails_30k_test", "hh_harmless", "pku_realign")
#: nlsr_lib.evaluate.wrappers.WRAPPERS (spec/evaluation.md §3, spec/somf.md §4.4)
WRAPPERS = Names("prompt wrapper", "identity", "cot", "cou", "suffix", "prefix_injection", "refusal_suppression", "aim")
#: nlsr_lib.evaluate.keywords.KEYWORD_LISTS (spec/evaluation.md §2.1); ``nlsr``: the project's first-person list
KEYWORD_LISTS = Names("keyword list", "nlsr", "gcg29", "jbb13", "rd12", "mi29", "gcg_demo10")
#: nlsr_lib.evaluate.llm_judges.PROTOCOLS (spec/evaluation.md §2.2-2.5, spec/somf.md §4.3)
LLM_PROTOCOLS = Names("LLM judge protocol", "strongreject", "harmbench", "jailbreakbench", "llama_guard", "xstest",
                      "pairwise", "helpfulness")

__all__ = ["ALIGNMENT_METHODS", "BENCHMARKS", "KEYWORD_LISTS", "LLM_PROTOCOLS", "WRAPPERS", "CORRECTIONS", "DECODERS", "DEFENCES", "GENERATION_BACKENDS", "JUDGES", "MERGE_METHODS", "REGION_SCORERS",
           "RESTORE_STRATEGIES", "SIMILARITIES", "FIELD_DEFENCES"]
