"""The embedded tiny world (spec/synthetic_world.md): the synthetic datasets with the hub schemas
(:mod:`.world`), the BPE tokenizer and the tiny Llama pretrained on them (:mod:`.model`), and the tiny moderation
judge with beaver-dam-7b's interface (:mod:`.judge`). Real profiles never import this package's trainers; the
stages of :mod:`nlsr_lib.stages.world` choose between these and hub ids.
"""
