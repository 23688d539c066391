"""Data: prompt templates, downstream-task formats, the synthetic world, real-data loaders and builders.

Modules: ``templates`` (Alpaca prompts, response extraction, moderation text), ``tasks`` (SST-2 / AG News /
GSM8K records), ``world`` (the embedded synthetic world), ``loaders`` (hub ids and local copies in the hub
schema), ``builders`` (alignment data and safety-evaluation prompts). Import from the submodules; this package
imports nothing eagerly so that ``templates`` stays cheap to import.
"""
