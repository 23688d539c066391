"""Benchmark: NLSR realignment of Llama-3-8B-shaped LoRA adapters on a CPU (DESIGN.md §5).

Adapters: 32 decoder layers × {q, k, v, o, gate, up, down} (hidden 4096, MLP 14336, 8 KV heads ⇒ k/v d_out 1024),
r = 128 — 224 modules, 448 tensors, 336M parameters per adapter — stored in **fp32**, the dtype real LoRA adapters
have here (PEFT keeps adapter weights in fp32 over a bf16 base, LLaMA-Factory trains them in fp32): 1.34 GB per
file. They are random (reference ~ N(0, 0.01²), fine-tuned = reference + N(0, 0.005²)) and written, with a
random mask of density 0.2 (the low_rank default keeps 20 % of entries), to a temporary directory by a child
process, so the peak RSS reported is that of the timed work alone. No base model is involved.

Timed, in this process:
* ``seconds`` — one full NLSR realignment, :func:`nlsr_lib.restore.realign`: read both adapters and the mask,
  Gram similarities, adaptive selection (seed 42), neuron-level transplant, write the adapter and the records.
* the similarity step alone, both ways: ``gram_seconds`` over all modules, and the explicit cosine of the
  d_out×d_in products (as the reference code). The explicit path costs 2·r·d_out·d_in multiply-adds per module
  (≈1.8·10¹² for the whole adapter, minutes on 2 cores), so by default it is timed on the modules of
  ``--explicit-layers`` decoder layers (1: one module of each of the seven shapes) and scaled by
  layers/explicit-layers — exact in expectation, since every decoder layer has the same shapes. The JSON
  records ``explicit_layers_timed`` and ``explicit_seconds_estimated``; ``--explicit-layers 32`` times all.
  ``speedup_vs_explicit`` = explicit (estimated for all modules) / Gram (measured for all modules).
* accuracy, for the record: the largest |explicit fp32 − Gram| over the timed modules, and on one k_proj module
  both against the explicit cosine in fp64 (the fp32 cosine of 10⁷-element vectors loses digits; Gram does not).

Prints progress, then one JSON object as its last line. ``--layers/--hidden/--intermediate/--kv/--rank`` shrink
the shapes (the tests run it tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nlsr bench restore", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--kv", type=int, default=1024, help="d_out of k_proj and v_proj")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.2, help="mask density")
    ap.add_argument("--explicit-layers", type=int, default=1, help="decoder layers timed on the explicit path")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--workdir", help="directory for the generated files (default: a temporary one)")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def module_shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each projection of a Llama decoder layer."""
    h, m, kv = args.hidden, args.intermediate, args.kv
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}


def module_name(layer: int, proj: str) -> str:
    block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{proj}"


def generate(args: argparse.Namespace, workdir: Path) -> None:
    """Write reference/, finetuned/ (PEFT adapter dirs, fp32) and mask.safetensors under ``workdir``."""
    from safetensors.torch import save_file

    from nlsr_lib.models import write_adapter

    g = torch.Generator().manual_seed(0)
    reference, finetuned, mask = {}, {}, {}
    for layer in range(args.layers):
        for proj, (d_out, d_in) in module_shapes(args).items():
            name = module_name(layer, proj)
            shapes = {f"{name}.lora_A.weight": (args.rank, d_in), f"{name}.lora_B.weight": (d_out, args.rank)}
            for key, shape in shapes.items():
                ref = torch.empty(shape).normal_(0.0, 0.01, generator=g)
                reference[key] = ref
                finetuned[key] = ref + torch.empty(shape).normal_(0.0, 0.005, generator=g)
                mask[key] = torch.rand(shape, generator=g) < args.density
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.rank, "lora_alpha": 2 * args.rank,
              "lora_dropout": 0.0, "target_modules": list(PROJECTIONS), "bias": "none", "use_rslora": False}
    write_adapter(workdir / "reference", reference, config)
    write_adapter(workdir / "finetuned", finetuned, config)
    save_file(mask, str(workdir / "mask.safetensors"))


def generate_in_child(argv: list[str], workdir: Path) -> None:
    """Run :func:`generate` in a child process so its memory does not count in this process's peak RSS."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--workdir", str(workdir), "--generate-only"]
    subprocess.run(cmd, check=True, env=env)


def time_similarity(finetuned, reference, modules, mask, method: str) -> tuple[float, torch.Tensor]:
    from nlsr_lib.restore import module_similarities

    start = time.perf_counter()
    sims = module_similarities(finetuned, reference, modules, mask, method, show_progress=False)
    return time.perf_counter() - start, sims


def run(args: argparse.Namespace, argv: list[str], workdir: Path) -> dict:
    from nlsr_lib.restore import explicit_similarity, gram_similarity, lora_modules, realign
    from nlsr_lib.restore.defences import load_mask
    from nlsr_lib.models import read_adapter

    t0 = time.perf_counter()
    generate_in_child(argv, workdir)
    n_params = args.layers * sum(args.rank * (o + i) for o, i in module_shapes(args).values())
    print(f"generated 2 adapters of {n_params / 1e6:.1f}M fp32 parameters and a mask in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    start = time.perf_counter()
    records = realign(workdir / "finetuned", workdir / "reference", workdir / "mask.safetensors",
                      workdir / "realigned", strategy="adaptive", seed=42)
    seconds = time.perf_counter() - start
    selected = sum(r["selected"] for r in records)
    print(f"NLSR realignment (read, similarity, selection, transplant, write): {seconds:.2f} s; "
          f"{selected}/{len(records)} modules restored", flush=True)

    finetuned, _ = read_adapter(workdir / "finetuned")
    reference, _ = read_adapter(workdir / "reference")
    mask = load_mask(workdir / "mask.safetensors")
    modules = lora_modules(finetuned)
    gram_seconds, gram = time_similarity(finetuned, reference, modules, mask, "gram")
    print(f"similarity, Gram, all {len(modules)} modules: {gram_seconds:.2f} s", flush=True)
    k = max(1, min(args.explicit_layers, args.layers))
    subset = [i for i, m in enumerate(modules) if m.layer is not None and m.layer < k]
    explicit_seconds, explicit = time_similarity(finetuned, reference, [modules[i] for i in subset], mask, "explicit")
    estimated = explicit_seconds * args.layers / k
    probe = next(m for m in modules if m.module_type == "k_proj")  # the smallest product: cheap in fp64
    args_probe = (finetuned[probe.key_a], finetuned[probe.key_b], reference[probe.key_a], reference[probe.key_b],
                  mask[probe.key_a], mask[probe.key_b])
    fp64 = explicit_similarity(*args_probe, dtype=torch.float64)
    print(f"similarity, explicit d_out×d_in products, {len(subset)} modules of {k} layer(s): {explicit_seconds:.2f} s"
          f" ⇒ {estimated:.1f} s estimated for all {len(modules)}", flush=True)
    return {
        "bench": "restore",
        "seconds": round(seconds, 3),
        "speedup_vs_explicit": round(estimated / gram_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "gram_seconds": round(gram_seconds, 3),
        "explicit_seconds": round(explicit_seconds, 3),
        "explicit_layers_timed": k,
        "explicit_seconds_estimated": round(estimated, 2),
        "explicit_fp32_vs_gram_max_abs_diff": float((explicit - gram[subset]).abs().max()),
        "gram_vs_fp64_abs_diff": abs(gram_similarity(*args_probe) - fp64),
        "explicit_fp32_vs_fp64_abs_diff": abs(explicit_similarity(*args_probe) - fp64),
        "modules": len(modules),
        "selected": selected,
        "parameters": n_params,
        "dtype": "float32",
        "rank": args.rank,
        "mask_density": args.density,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generate_only:
        generate(args, Path(args.workdir))
        return 0
    argv = [a for a in argv if a != "--generate-only"]
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        result = run(args, argv, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="nlsr-bench-restore-") as tmp:
            result = run(args, argv, Path(tmp))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
