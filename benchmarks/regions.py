"""Benchmark: the ``low_rank`` region scorer against one plain forward over the same tokens (DESIGN.md §5).

A randomly initialised Llama (``--shape cpu``: hidden 1024, 16 layers, MLP 2816, vocab 32000, ≈ 290M
parameters with the adapter) carries a LoRA of rank ``--rank`` (64) on all seven projections with random nonzero
A and B. The calibration set is ``--batches`` × ``--batch-size`` sequences of ``--seq-len`` tokens (cpu: 8 × 256)
whose first half is prompt-masked (labels −100). In one process the benchmark times, in ``--repeats``
interleaved rounds (3; the minimum of each is reported, the usual estimator under load from other processes),

* one plain forward of the PeftModel over every batch (``no_grad``, logits included), and
* ``build_mask("low_rank", ...)``: the hooked statistics pass, the exact eigendecompositions and the magnitude
  masks (``seconds``);

``ratio_vs_forward = seconds / forward``; the target is ≤ 2. ``solve_seconds`` times the eigendecompositions alone
(on Gram matrices of the same shapes). ``--shape 1b|8b --device cuda --dtype bfloat16`` runs Llama-3.2-1B- and
Llama-3-8B-shaped models on a GPU; ``--shape tiny`` is the unit tests' seconds-long run. The last line printed is
one JSON object: ``{"bench": "regions", "ratio_vs_forward": …, "seconds": …, "peak_rss_mb": …, …}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

SHAPES = {
    #        hidden, layers, intermediate, heads, kv heads, vocab, rank
    "tiny": (32, 2, 64, 2, 2, 128, 4),
    "cpu": (1024, 16, 2816, 16, 16, 32000, 64),
    "1b": (2048, 16, 8192, 32, 8, 128256, 128),
    "8b": (4096, 32, 14336, 32, 8, 128256, 128),
}
DEFAULT_DATA = {"tiny": (2, 2, 16), "cpu": (2, 4, 256), "1b": (64, 8, 512), "8b": (64, 8, 512)}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(shape: str, device: str, dtype: torch.dtype, rank: int | None, seed: int):
    """A random Llama of ``shape`` with a LoRA (random nonzero A and B) on the seven projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv, vocab, default_rank = SHAPES[shape]
    r = rank or default_rank
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                             target_modules=list(PROJECTIONS))).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.02, generator=gen)
    return model, cfg, r


def make_batches(vocab: int, n_batches: int, batch_size: int, seq_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        labels = ids.clone()
        labels[:, : seq_len // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model, batches, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - start


def time_solve(model, seed: int) -> float:
    """The eigendecompositions alone, on random PSD r × r Gram matrices of the modules' shapes."""
    from nlsr_lib.regions.lowrank import output_directions, principal_directions, rank_to_keep
    from nlsr_lib.regions.threads import single_thread
    from nlsr_lib.regions.lora import lora_modules

    gen = torch.Generator().manual_seed(seed)
    work = []
    for _name, layer in lora_modules(model):
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        z = torch.randn(4 * a.shape[0], a.shape[0], generator=gen).to(a.device)
        work.append((a, b, z.T @ z))
    _sync(str(a.device))
    start = time.perf_counter()
    with single_thread():
        for a, b, gram in work:
            principal_directions(gram, rank_to_keep(tuple(a.shape), 0.8))
            output_directions(b, gram, rank_to_keep(tuple(b.shape), 0.8))
    _sync(str(a.device))
    return time.perf_counter() - start


def run(shape: str = "cpu", device: str = "cpu", dtype: str = "float32", n_batches: int | None = None,
        batch_size: int | None = None, seq_len: int | None = None, rank: int | None = None, seed: int = 0,
        repeats: int = 1) -> dict:
    from nlsr_lib.regions import build_mask, overall_density

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    nb, bs, sl = DEFAULT_DATA[shape]
    nb, bs, sl = n_batches or nb, batch_size or bs, seq_len or sl
    print(f"building a random {shape}-shaped Llama on {device} ({dtype}) ...", flush=True)
    model, cfg, r = build_model(shape, device, torch_dtype, rank, seed)
    n_params = sum(p.numel() for p in model.parameters())
    batches = make_batches(cfg.vocab_size, nb, bs, sl, seed)
    print(f"{n_params / 1e6:.1f}M parameters, LoRA r={r}; calibration {nb}x{bs}x{sl} tokens", flush=True)
    time_forward(model, batches[:1], device)  # warm-up (allocator, kernels)
    forwards, scorers = [], []
    for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
        forwards.append(time_forward(model, batches, device))
        print(f"plain forward: {forwards[-1]:.2f}s", flush=True)
        _sync(device)
        start = time.perf_counter()
        masks = build_mask("low_rank", model, batches, 0.8, rank_keep_ratio=0.8, show_progress=False)
        _sync(device)
        scorers.append(time.perf_counter() - start)
        print(f"low_rank scorer + masks: {scorers[-1]:.2f}s (density {overall_density(masks):.4f})", flush=True)
    forwards.append(time_forward(model, batches, device))
    print(f"plain forward: {forwards[-1]:.2f}s", flush=True)
    solve = time_solve(model, seed)
    print(f"eigendecompositions alone: {solve:.2f}s", flush=True)
    seconds, forward = min(scorers), min(forwards)
    result = {
        "bench": "regions", "ratio_vs_forward": round(seconds / forward, 4), "seconds": round(seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "forward_seconds": round(forward, 3), "solve_seconds": round(solve, 3), "repeats": repeats,
        "all_forward_seconds": [round(t, 2) for t in forwards], "all_scorer_seconds": [round(t, 2) for t in scorers],
        "shape": shape, "device": device,
        "dtype": dtype, "params_m": round(n_params / 1e6, 1), "lora_rank": r, "tokens": nb * bs * sl,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nlsr bench regions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--batches", type=int, default=None, help="number of calibration batches")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: per shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None, help="timed (forward, scorer) rounds; min is reported")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.shape == "tiny" else 3)
    result = run(args.shape, args.device, args.dtype, args.batches, args.batch_size, args.seq_len, args.rank,
                 args.seed, repeats)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
