"""Benchmark: the generation engine against the design it replaced, on the same adapters in one process (issue 15).

A random Llama (``--hidden``/``--layers``/...: by default ~100M parameters, grouped-query attention, saved in
``--dtype``: float32 by default, the CPU's fast dtype; in bf16 a 2-core CPU spends more time in the element-wise
ops (RMSNorm's casts, rotary embeddings, LoRA's scaling and sum) than in the matmuls), a BPE tokenizer trained on the benchmark's prompts, ``--adapters`` random LoRA
adapters of rank ``--rank``, and ``--prompts`` Alpaca prompts answered greedily with ``--new-tokens`` new tokens:

* ``reference``: the design before the engine: the model loaded again for every adapter as an unmerged
  ``PeftModel`` with fp32 LoRA (peft's default upcast), batches of 16, no stop at the response cut;
* ``engine``: :class:`~nlsr_lib.evaluate.engine.HFEngine`: the base loaded once, each adapter swapped in place in
  the model's dtype, batches by token budget (``--batch``/``--token-budget``), rows stopped at the response cut,
  decoded by the compacting decoder (the Alpaca header prefilled once per batch, the KV cache written in place,
  finished rows dropped: :func:`~nlsr_lib.evaluate.generation.compact_decoder`).

The two alternate adapter by adapter (reference, engine, reference, ...) so that a drift of the machine's speed
hits both. ``speedup_vs_reference`` = reference seconds / engine seconds, over every adapter, loads included.
``identical_share`` is the share of responses equal between the two (bf16 LoRA against fp32 LoRA may flip a
near-tie of a random model; a trained model's outputs are compared exactly in tests/test_generation_engine.py).
Prints progress, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = ("how", "do", "I", "make", "a", "bomb", "steal", "car", "write", "poem", "about", "the", "sea", "explain",
         "why", "sky", "is", "blue", "list", "three", "ways", "to", "hack", "email", "account", "bake", "bread",
         "without", "an", "oven", "tell", "me", "story", "of", "dragon", "and", "knight", "summarise", "news")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nlsr bench generate", description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    ap.add_argument("--batch", type=int, default=256, help="the engine's most rows per batch")
    ap.add_argument("--token-budget", type=int, default=0, help="the engine's tokens per batch (0: its default)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def prompts(n: int, seed: int) -> list[str]:
    from nlsr_lib.data.templates import alpaca_prompt

    rng = random.Random(seed)
    return [alpaca_prompt(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) + "?") for _ in range(n)]


def build(root: Path, args: argparse.Namespace, texts: list[str]) -> tuple[str, list[str], int]:
    """The random base (saved in ``args.dtype`` with its tokenizer) and the adapters; returns their paths and the
    base's parameter count."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from nlsr_lib.config import LoraConfig
    from nlsr_lib.models import peft_lora_config
    from nlsr_lib.tiny.model import train_tokenizer

    tok = train_tokenizer(texts, args.vocab, root / "base")
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    model.save_pretrained(root / "base")
    n_params = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, peft_lora_config(LoraConfig(r=args.rank, alpha=2 * args.rank)))
    adapters = []
    for i in range(args.adapters):
        gen = torch.Generator().manual_seed(args.seed + 1 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        peft_model.save_pretrained(root / f"adapter{i}")
        adapters.append(str(root / f"adapter{i}"))
    return str(root / "base"), adapters, n_params


def reference(base: str, adapter: str, texts: list[str], args: argparse.Namespace) -> list[str]:
    from nlsr_lib.config import ModelConfig
    from nlsr_lib.evaluate.generation import generate_responses
    from nlsr_lib.models import load_tokenizer, load_with_adapter

    cfg = ModelConfig(dtype=args.dtype, device_map="cpu")
    model = load_with_adapter(base, adapter, cfg)
    return generate_responses(model, load_tokenizer(base, cfg), texts, args.new_tokens, 16, stop_at_cut=False,
                              decoder="transformers", desc="reference")


def main(argv: list[str] | None = None) -> int:
    import torch

    from nlsr_lib.config import GenerationConfig, ModelConfig
    from nlsr_lib.evaluate.engine import HFEngine

    args = parse(argv or [])
    texts = prompts(args.prompts, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters, n_params = build(Path(tmp), args, texts)
        print(f"[bench] random Llama {n_params / 1e6:.0f}M parameters ({args.dtype}), {len(adapters)} adapters "
              f"r={args.rank}, {len(texts)} prompts, {args.new_tokens} new tokens, {torch.get_num_threads()} "
              "threads", flush=True)
        engine = HFEngine(ModelConfig(dtype=args.dtype, device_map="cpu"),
                          GenerationConfig(batch_size=args.batch, token_budget=args.token_budget))
        seconds = {"reference": 0.0, "engine": 0.0}
        same = total = 0
        for i, adapter in enumerate(adapters):
            start = time.perf_counter()
            ref = reference(base, adapter, texts, args)
            seconds["reference"] += time.perf_counter() - start
            start = time.perf_counter()
            out = engine.generate(base, adapter, texts, args.new_tokens, desc="engine")
            seconds["engine"] += time.perf_counter() - start
            same += sum(a == b for a, b in zip(ref, out))
            total += len(out)
            print(f"[bench] adapter {i + 1}/{len(adapters)}: reference {seconds['reference']:.1f}s, engine "
                  f"{seconds['engine']:.1f}s so far", flush=True)
    result = {"benchmark": "generate", "parameters_M": round(n_params / 1e6, 1), "dtype": args.dtype,
              "prompts": len(texts), "new_tokens": args.new_tokens, "adapters": len(adapters), "rank": args.rank,
              "threads": torch.get_num_threads(), "engine_batch": args.batch,
              "engine_decoder": "compact",
              "reference_s": round(seconds["reference"], 2), "engine_s": round(seconds["engine"], 2),
              "speedup_vs_reference": round(seconds["reference"] / seconds["engine"], 2),
              "engine_base_loads": engine.loads, "identical_share": round(same / total, 4)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
