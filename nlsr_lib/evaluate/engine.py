"""Generation engines: greedy responses of (base, adapter) pairs, backends in a registry (DESIGN.md §5).

Evaluation is the dominant cost of the paper grid, so an engine keeps what is expensive across calls:

* ``hf``: each base model is loaded once per process (:func:`engine` caches engines; the two most recently used
  bases stay in memory) and adapters are **swapped in place** with PEFT (``load_adapter`` / ``set_adapter``; the
  previous adapter is deleted), in the model's dtype (``autocast_adapter_dtype=False``: bf16 LoRA on a bf16
  base). Batches are sized by a token budget and rows stop at the response cut (:mod:`.generation`). The
  computation per row is the one of a freshly loaded ``PeftModel``: greedy outputs are those of the old
  load-per-evaluation path (tests/test_generation_engine.py).
* ``vllm``: vLLM with multi-LoRA (``LoRARequest`` per adapter), the base loaded once, greedy sampling with the
  same cut markers as stop strings; the optional extra ``[vllm]``. Same responses format.

An engine is asked for ``generate(base, adapter, prompts, max_new_tokens, desc)``; ``adapter=None`` is the base
itself. Adapters are read once for a finiteness check (NaN/inf weights are refused by key).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from .. import names
from ..config import GenerationConfig, ModelConfig, Params
from ..data.templates import RESPONSE_MARKER, STOP_MARKER, extract_response
from ..registry import Registry


class Engine(Protocol):
    name: str

    def generate(self, base: str, adapter: str | None, prompts: Sequence[str], max_new_tokens: int,
                 desc: str = "generate") -> list[str]: ...


def adapter_name(adapter: str | Path) -> str:
    """A PEFT adapter name for an adapter directory (stable, no dots: PEFT uses names as module keys)."""
    return "a" + hashlib.sha256(str(Path(adapter).resolve()).encode()).hexdigest()[:16]


def default_token_budget(model: torch.nn.Module, max_rows: int, row_tokens: int) -> int:
    """Tokens per batch (padded prompt + new tokens over rows) when params leave it at 0: on a GPU, a third of
    the free memory divided by one token's KV-cache bytes; on a CPU, ``max_rows`` rows of ``row_tokens``."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return max_rows * row_tokens
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return max(row_tokens, int(free / 3 / per_token))


class HFEngine:
    """``transformers`` generation on kept bases with adapters swapped in place (module docstring)."""

    name = "hf"

    def __init__(self, model_cfg: ModelConfig, gen: GenerationConfig, max_bases: int = 2):
        self.model_cfg, self.gen, self.max_bases = model_cfg, gen, max_bases
        self.bases: OrderedDict[str, dict] = OrderedDict()  # base -> {"model", "tokenizer", "adapter"}
        self.loads = 0

    def _base(self, base: str) -> dict:
        from ..models import load_causal_lm, load_tokenizer

        if base in self.bases:
            self.bases.move_to_end(base)
            return self.bases[base]
        while len(self.bases) >= self.max_bases:
            self.bases.popitem(last=False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        entry = {"model": load_causal_lm(base, self.model_cfg), "tokenizer": load_tokenizer(base, self.model_cfg),
                 "adapter": None}
        self.loads += 1
        self.bases[base] = entry
        return entry

    def model_for(self, base: str, adapter: str | None):
        """The kept model of ``base`` with ``adapter`` active (or every adapter disabled for ``None``): a context
        manager yielding ``(model, tokenizer)``."""
        entry = self._base(base)
        return _ActiveAdapter(entry, adapter)

    def generate(self, base: str, adapter: str | None, prompts: Sequence[str], max_new_tokens: int,
                 desc: str = "generate") -> list[str]:
        from .generation import generate_responses

        with self.model_for(base, adapter) as (model, tokenizer):
            longest = max((len(p) for p in prompts), default=0)  # characters bound tokens from above
            budget = self.gen.token_budget or default_token_budget(model, self.gen.batch_size,
                                                                   longest + max_new_tokens)
            return generate_responses(model, tokenizer, prompts, max_new_tokens, self.gen.batch_size,
                                      token_budget=budget, decoder=self.gen.decoder, desc=desc)


class _ActiveAdapter:
    """Activate an adapter on a kept base for one evaluation (PEFT load/set/delete), or disable adapters."""

    def __init__(self, entry: dict, adapter: str | None):
        self.entry, self.adapter = entry, None if adapter is None else str(adapter)

    def __enter__(self):
        entry, model = self.entry, self.entry["model"]
        if self.adapter is None:
            if hasattr(model, "disable_adapter"):
                self._disabled = model.disable_adapter()
                self._disabled.__enter__()
            return model, entry["tokenizer"]
        name = adapter_name(self.adapter)
        if entry["adapter"] != name:
            check_adapter(self.adapter)
            entry["model"] = model = swap_adapter(model, self.adapter, name, entry["adapter"])
            entry["adapter"] = name
        return model.eval(), entry["tokenizer"]

    def __exit__(self, *exc):
        if getattr(self, "_disabled", None) is not None:
            self._disabled.__exit__(*exc)
        return False


def check_adapter(adapter: str | Path) -> None:
    """Refuse NaN/inf adapter weights, naming the key and the directory (read tensor by tensor)."""
    from ..models import read_adapter

    read_adapter(adapter)


def swap_adapter(model, adapter: str, name: str, previous: str | None):
    """``model`` (a base or a PeftModel) with the adapter at ``adapter`` loaded as ``name`` and active, in the
    model's dtype; the previously active adapter ``previous`` is deleted so memory holds one adapter."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return PeftModel.from_pretrained(model, adapter, adapter_name=name, autocast_adapter_dtype=False).eval()
    model.load_adapter(adapter, adapter_name=name, autocast_adapter_dtype=False)
    model.set_adapter(name)
    if previous is not None and previous in model.peft_config:
        model.delete_adapter(previous)
    return model


class VLLMEngine:
    """vLLM with multi-LoRA: one ``LLM`` per base (the latest kept), an integer id per adapter directory, greedy
    ``SamplingParams`` stopping at the response cut markers (optional extra ``[vllm]``)."""

    name = "vllm"

    def __init__(self, model_cfg: ModelConfig, gen: GenerationConfig, max_lora_rank: int = 128):
        try:
            import vllm  # noqa: F401
        except ImportError as err:  # the optional extra is missing
            raise ImportError("generation.backend 'vllm' needs vLLM: pip install -e '.[vllm]' (on a CUDA machine); "
                              "or set generation.backend: hf") from err
        self.model_cfg, self.gen, self.max_lora_rank = model_cfg, gen, max_lora_rank
        self.base: str | None = None
        self.llm = None
        self.lora_ids: dict[str, int] = {}
        self.loads = 0

    def _llm(self, base: str):
        from vllm import LLM

        if self.base != base:
            self.llm = LLM(model=base, dtype=self.model_cfg.dtype, enable_lora=True,
                           max_lora_rank=self.max_lora_rank, max_loras=1, seed=0,
                           trust_remote_code=self.model_cfg.trust_remote_code)
            self.base, self.loads = base, self.loads + 1
        return self.llm

    def lora_request(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        check_adapter(adapter)
        lora_id = self.lora_ids.setdefault(str(adapter), len(self.lora_ids) + 1)
        return LoRARequest(adapter_name(adapter), lora_id, str(adapter))

    def generate(self, base: str, adapter: str | None, prompts: Sequence[str], max_new_tokens: int,
                 desc: str = "generate") -> list[str]:
        from vllm import SamplingParams

        sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[RESPONSE_MARKER, STOP_MARKER],
                                  include_stop_str_in_output=True)
        outputs = self._llm(base).generate(list(prompts), sampling, lora_request=self.lora_request(adapter),
                                           use_tqdm=False)
        return [extract_response(p + o.outputs[0].text) for p, o in zip(prompts, outputs)]


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank ``r``."""
    fitting = [k for k in VLLM_LORA_RANKS if k >= r]
    if not fitting:
        raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; lora.r is {r}")
    return fitting[0]


ENGINES: Registry[Callable[[Params], Engine]] = Registry(names.GENERATION_BACKENDS)
ENGINES.register("hf", lambda params: HFEngine(params.model, params.generation))
ENGINES.register("vllm", lambda params: VLLMEngine(params.model, params.generation,
                                                   max_lora_rank=vllm_lora_rank(params.lora.r)))

_KEPT: dict[tuple, Engine] = {}


def engine(params: Params) -> Engine:
    """The process's engine for these settings (created on first use, then kept with its loaded bases; one engine
    per process, so a change of settings releases the previous one's models)."""
    key = (params.generation, params.model, params.lora.r)
    if key not in _KEPT:
        release()
        _KEPT[key] = ENGINES[params.generation.backend](params)
    return _KEPT[key]


def release() -> None:
    """Drop the kept engine and its models (frees their memory)."""
    _KEPT.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
