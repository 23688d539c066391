"""Streaming TIES merge of full checkpoints vs mergekit's TIES on the same files (DESIGN.md §5; merging.md §4).

Builds, in a temporary directory, a random base checkpoint and ``--models`` fine-tunes of it (base + small noise)
of a Llama-shaped config (``--shape``: tiny, 0.5b ≈ 0.52 B parameters, 7b = Llama-2-7B), bf16, sharded safetensors
with an HF index and a config.json. Then it times, each in its own subprocess so that peak RSS is measured the same
way for both (``os.wait4`` returns the child's own ``ru_maxrss``):

* ours: :func:`nlsr_lib.fusion.merge_checkpoints` with ``ties``, density 0.2, λ = 1, disjoint mean, trimming scope
  ``tensor`` (fp32 math on ``--device``);
* mergekit (when importable): ``mergekit-yaml`` with ``merge_method: ties``, the same density, weight 1 per model,
  ``normalize: true`` (the disjoint mean), the same output shard size — mergekit's semantics, in bf16.

It also reports the largest difference between the two outputs on a few tensors (bf16 arithmetic and argsort tie
order make them differ slightly). Last line: one JSON object
``{"bench": "merge", "seconds", "ratio_vs_mergekit", "peak_rss_mb", "mergekit_peak_rss_mb", ...}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=50000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def log(msg: str) -> None:
    print(f"[bench merge] {msg}", flush=True)


def make_checkpoints(root: Path, shape: str, n_models: int, shard_bytes: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """A random bf16 base (N(0, 0.02²)) and ``n_models`` fine-tunes (base + U(−0.004, 0.004)), written tensor by
    tensor; an existing set of the same shape under ``root`` is reused (``--workdir`` with ``--keep``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nlsr_lib.fusion import ShardedWriter, TensorMeta

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    metas = [TensorMeta(k, tuple(v.shape), torch.bfloat16) for k, v in model.state_dict().items()]
    del model
    dirs = [root / "base"] + [root / f"model{i}" for i in range(n_models)]
    stamp = root / "inputs.json"
    key = {"shape": shape, "models": n_models, "shard_bytes": shard_bytes, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == key and all(d.is_dir() for d in dirs):
        return dirs[0], dirs[1:]
    shutil.rmtree(root, ignore_errors=True)
    writers = [ShardedWriter(d, metas, shard_bytes) for d in dirs]
    gen = torch.Generator().manual_seed(seed)
    for meta in metas:
        if meta.name.endswith("norm.weight"):
            base = torch.ones(meta.shape)
        else:
            base = torch.randn(meta.shape, generator=gen).mul_(0.02)
        writers[0].write(meta.name, base.to(torch.bfloat16))
        for w in writers[1:]:
            noise = torch.empty(meta.shape).uniform_(-0.004, 0.004, generator=gen)
            w.write(meta.name, noise.add_(base).to(torch.bfloat16))
        del base
    for d, w in zip(dirs, writers):
        config.save_pretrained(w.tmp_dir)
        w.close()
    stamp.write_text(json.dumps(key))
    return dirs[0], dirs[1:]


def _run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB of that child, its stdout) — ``os.wait4`` gives the child's own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{out[-4000:]}")
    return seconds, usage.ru_maxrss / 1024.0, out


def worker(args: argparse.Namespace) -> int:
    """The merge itself, in a subprocess of its own (``--worker``)."""
    from nlsr_lib.fusion import merge_checkpoints

    models = args.worker_models.split(",")
    start = time.perf_counter()
    merge_checkpoints(args.worker_base, models, args.worker_out, "ties", density=args.density, lam=1.0,
                      disjoint="mean", scope=args.scope, device=args.device, max_shard_size=args.shard_bytes,
                      progress=False)
    print(json.dumps({"merge_seconds": time.perf_counter() - start}))
    return 0


def mergekit_available() -> str | None:
    try:
        from importlib.metadata import version

        if importlib.util.find_spec("mergekit") is None:
            return None
        return version("mergekit")
    except Exception:
        return None


def run_mergekit(base: Path, models: list[Path], out: Path, density: float, shard_bytes: int,
                 device: str) -> tuple[float, float]:
    import yaml

    config = {
        "merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
        "parameters": {"normalize": True},
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": density}} for m in models],
    }
    cfg_path = out.parent / "mergekit_ties.yml"
    cfg_path.write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    cmd = [str(exe), str(cfg_path), str(out), "--out-shard-size", str(shard_bytes), "--no-copy-tokenizer",
           "--no-write-model-card", "--quiet", "--random-seed", "0"]
    if device != "cpu":
        cmd += ["--device", device]
    seconds, rss, _ = _run_measured(cmd)
    return seconds, rss


def max_abs_diff(a_dir: Path, b_dir: Path, names: list[str]) -> float:
    from nlsr_lib.fusion import CheckpointReader

    with CheckpointReader(a_dir) as a, CheckpointReader(b_dir) as b:
        return max(float((a.read(n).float() - b.read(n).float()).abs().max()) for n in names)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nlsr bench merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    p.add_argument("--models", type=int, default=3, help="fine-tuned checkpoints merged onto the base")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--scope", choices=("tensor", "global"), default="tensor",
                   help="our trimming scope (mergekit trims per tensor)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (for both tools)")
    p.add_argument("--shard-bytes", type=int, default=500_000_000, help="input and output shard size in bytes")
    p.add_argument("--workdir", help="where to build the checkpoints (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when it is installed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-base", help=argparse.SUPPRESS)
    p.add_argument("--worker-models", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    if args.worker:
        return worker(args)
    from nlsr_lib.fusion import CheckpointReader

    mk_version = None if args.no_mergekit else mergekit_available()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nlsr-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        base, models = make_checkpoints(work / "inputs", args.shape, args.models, args.shard_bytes)
        with CheckpointReader(base) as reader:
            n_params = sum(m.numel for m in reader.meta.values())
        log(f"built base + {args.models} models of shape {args.shape} ({n_params / 1e9:.3f} B parameters, bf16) in "
            f"{time.perf_counter() - t0:.1f}s under {work}")

        ours_out = work / "ours"
        for out_dir in (ours_out, work / "mergekit"):
            shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-base", str(base),
               "--worker-models", ",".join(map(str, models)), "--worker-out", str(ours_out),
               "--density", str(args.density), "--scope", args.scope, "--device", args.device,
               "--shard-bytes", str(args.shard_bytes)]
        env = {**os.environ, "NLSR_QUIET": "1"}
        seconds, rss, out = _run_measured(cmd, env)
        merge_seconds = json.loads(out.strip().splitlines()[-1])["merge_seconds"]
        log(f"ours (ties, density {args.density}, scope {args.scope}, {args.device}): {seconds:.1f}s wall "
            f"({merge_seconds:.1f}s merging), peak RSS {rss:.0f} MB")

        result = {"bench": "merge", "seconds": round(seconds, 2), "ratio_vs_mergekit": None,
                  "peak_rss_mb": round(rss, 1), "mergekit_peak_rss_mb": None, "mergekit_seconds": None,
                  "mergekit_version": mk_version, "shape": args.shape, "parameters": n_params,
                  "models": args.models, "density": args.density, "scope": args.scope, "device": args.device,
                  "merge_seconds": round(merge_seconds, 2)}
        if mk_version:
            mk_out = work / "mergekit"
            mk_seconds, mk_rss = run_mergekit(base, models, mk_out, args.density, args.shard_bytes, args.device)
            log(f"mergekit {mk_version} (ties, density {args.density}, bf16): {mk_seconds:.1f}s wall, "
                f"peak RSS {mk_rss:.0f} MB")
            names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
            diff = max_abs_diff(ours_out, mk_out, names)
            log(f"max |ours − mergekit| on {len(names)} tensors: {diff:.3g} (bf16 rounding and tie order)")
            result.update(ratio_vs_mergekit=round(seconds / mk_seconds, 3), mergekit_peak_rss_mb=round(mk_rss, 1),
                          mergekit_seconds=round(mk_seconds, 2), max_abs_diff_vs_mergekit=diff)
        elif args.no_mergekit:
            log("mergekit skipped (--no-mergekit): no comparison")
        else:
            log("mergekit is not installed (`make bench` installs the bench extra): no comparison")
        print(json.dumps(result))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
