"""Merges of LoRA adapters, in factor space and as dense deltas (spec/somf.md §2.1, §3, §6.4; DESIGN.md §4).

**Factor space** (SOMF's setting, :func:`merge_adapters`): every task adapter continued training from the aligned
adapter (one LoRA parameter space over W_sft), so the task vector is taken key by key on the factors,
``τ_t[k] = θ_t[k] − θ_aligned[k]`` for every ``lora_A`` and ``lora_B`` tensor, and the merged adapter is
``θ_aligned + Merge(τ)`` — a PEFT adapter with the aligned adapter's config. Adapters only; the base model is
never loaded.

**Dense deltas** (:func:`merge_lora_deltas`): each adapter ``i`` is the module-level update
``D_i = κ_i · B_i A_i`` (``κ = lora_alpha / r``, :func:`nlsr_lib.models.lora_scaling`) relative to W_sft, so ranks
may differ. Task vectors ``τ_i = D_i − D_ref`` (``D_ref = 0`` without a ``reference`` adapter) are merged module
by module and streamed to disk. Write-back (decided here):

* with ``base_dir`` (W_sft): a full checkpoint ``W_sft + D_ref + Δ`` in W_sft's dtype, every other tensor copied —
  what ``AutoModelForCausalLM.from_pretrained`` and the evaluation code load;
* without: a **delta checkpoint**, sharded safetensors keyed by the base's weight names
  (``model.layers.0.self_attn.q_proj.weight``) holding ``D_ref + Δ`` in fp32; :func:`apply_delta_checkpoint`
  adds it onto any base later, streaming.

The merged dense delta is not re-factored into a LoRA (that would need an SVD and lose TIES/DARE's sparsity).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..models import copy_tokenizer_files, lora_scaling, read_adapter, write_adapter
from ..regions.lora import split_key
from .inmemory import apply_delta, merge_task_vectors, task_vectors
from .layout import LayoutError, TensorMeta
from .safetensors_io import CheckpointReader
from .stream import PROVENANCE, MergeInputs, stream_merge

_PEFT_PREFIX = "base_model.model."
_FACTOR_FIELDS = ("r", "lora_alpha", "use_rslora", "target_modules")


# --------------------------------------------------------------------------------------------- factor space
def check_same_lora(configs: Sequence[Mapping], names: Sequence[str]) -> None:
    """Factor-space merges need one parameter space: same r, alpha, rsLoRA flag and target modules."""
    ref = configs[0]
    for name, cfg in zip(names[1:], configs[1:]):
        for fld in _FACTOR_FIELDS:
            a, b = ref.get(fld), cfg.get(fld)
            if fld == "target_modules" and a is not None and b is not None:
                a, b = sorted(a), sorted(b)
            if a != b:
                raise LayoutError(f"adapter {name}: {fld} = {b!r} but {names[0]} has {a!r}; factor-space merges need "
                                  f"adapters of one LoRA parameter space (use merge_lora_deltas otherwise)")


def merge_adapter_states(aligned: Mapping[str, torch.Tensor], tasks: Sequence[Mapping[str, torch.Tensor]],
                         method: str, *, scope: str = "tensor", single_task_identity: bool = False,
                         **params) -> dict[str, torch.Tensor]:
    """``θ_aligned + Merge({θ_t − θ_aligned})`` on adapter state dicts (fp32 math, stored in their dtype)."""
    taus = task_vectors(aligned, tasks, names=[f"task adapter {i}" for i in range(len(tasks))])
    delta = merge_task_vectors(taus, method, scope=scope, single_task_identity=single_task_identity, **params)
    return apply_delta(aligned, delta)


def merge_adapters(aligned_dir: str | Path, task_dirs: Sequence[str | Path], out_dir: str | Path, method: str, *,
                   scope: str = "tensor", single_task_identity: bool = False, **params) -> Path:
    """Merge task adapters in LoRA-factor space relative to the aligned adapter and write a PEFT adapter."""
    aligned_dir, out_dir = Path(aligned_dir), Path(out_dir)
    aligned, cfg = read_adapter(aligned_dir)
    loaded = [read_adapter(d) for d in task_dirs]
    check_same_lora([cfg] + [c for _, c in loaded], [str(aligned_dir)] + [str(d) for d in task_dirs])
    merged = merge_adapter_states(aligned, [s for s, _ in loaded], method, scope=scope,
                                  single_task_identity=single_task_identity, **params)
    write_adapter(out_dir, merged, cfg)
    copy_tokenizer_files(aligned_dir, out_dir)
    record = {"method": method, "scope": scope, "single_task_identity": single_task_identity, "params": params,
              "space": "lora_factors", "aligned": str(aligned_dir), "tasks": [str(d) for d in task_dirs]}
    (out_dir / PROVENANCE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------- dense deltas
def module_weight_name(adapter_key: str) -> str:
    """The base weight a LoRA factor adapts: ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` →
    ``model.layers.0.self_attn.q_proj.weight``."""
    split = split_key(adapter_key)
    if split is None:
        raise ValueError(f"adapter key {adapter_key!r} is neither a lora_A nor a lora_B weight")
    name = split[0] + ".weight"
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def lora_factors(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{base weight name: (B, A)}`` of an adapter state dict (every module needs both factors)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        parts.setdefault(module_weight_name(key), {})[split_key(key)[1]] = t
    for name, p in parts.items():
        if set(p) != {"A", "B"}:
            raise LayoutError(f"module {name}: the adapter has only lora_{''.join(p)}")
    return {name: (p["B"], p["A"]) for name, p in parts.items()}


class LoraDeltaInputs(MergeInputs):
    """Dense deltas ``κ_i B_i A_i`` of adapters on one base W_sft (see the module docstring for the outputs)."""

    def __init__(self, adapter_dirs: Sequence[str | Path], *, base_dir: str | Path | None = None,
                 reference: str | Path | None = None, out_dtype: torch.dtype = torch.float32):
        if not adapter_dirs:
            raise ValueError("LoraDeltaInputs: no adapters to merge")
        self.adapters = []
        for d in adapter_dirs:
            state, cfg = read_adapter(d)
            self.adapters.append((str(d), lora_factors(state), lora_scaling(cfg)))
        self.reference = None
        if reference is not None:
            state, cfg = read_adapter(reference)
            self.reference = (str(reference), lora_factors(state), lora_scaling(cfg))
        self.n_tasks = len(self.adapters)
        first_name, first, _ = self.adapters[0]
        self.shapes = {name: (b.shape[0], a.shape[1]) for name, (b, a) in first.items()}
        for name_i, factors, _ in self.adapters[1:] + ([self.reference] if self.reference else []):
            missing, extra = set(first) - set(factors), set(factors) - set(first)
            if missing or extra:
                raise LayoutError(f"adapter {name_i} adapts other modules than {first_name}: missing "
                                  f"{sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
            for name, (b, a) in factors.items():
                if (b.shape[0], a.shape[1]) != self.shapes[name]:
                    raise LayoutError(f"module {name}: dense delta {tuple(self.shapes[name])} in {first_name} but "
                                      f"{(b.shape[0], a.shape[1])} in {name_i}")
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.base = CheckpointReader(base_dir) if base_dir is not None else None
        if self.base is not None:
            for name, shape in self.shapes.items():
                if name not in self.base.meta:
                    raise LayoutError(f"module {name} of the adapters is not a weight of the base {base_dir} "
                                      f"(adapters trained on another base?)")
                if tuple(self.base.meta[name].shape) != tuple(shape):
                    raise LayoutError(f"module {name}: base weight {tuple(self.base.meta[name].shape)} but the "
                                      f"adapters' delta is {tuple(shape)}")
        self.out_dtype = out_dtype

    def plan(self) -> list[TensorMeta]:
        if self.base is not None:
            return list(self.base.meta.values())
        return [TensorMeta(name, tuple(shape), self.out_dtype) for name, shape in self.shapes.items()]

    def merged(self, name: str) -> bool:
        return name in self.shapes

    def bytes_read(self, name: str) -> int:
        return self.base.nbytes(name) if self.base is not None else 0

    def load(self, name):
        base = self.base.read(name) if self.base is not None else None
        return base, ([] if self.merged(name) else None)

    @staticmethod
    def _dense(factors, kappa, name, device) -> torch.Tensor:
        b, a = factors[name]
        return (b.to(device).float() @ a.to(device).float()).mul_(kappa)

    def task_vectors(self, name, loaded, device):
        base, _ = loaded
        base_f = base.to(device).float() if base is not None else None  # the reference is added below
        taus = [self._dense(f, k, name, device) for _, f, k in self.adapters]
        if self.reference is not None:
            _, f, k = self.reference
            ref = self._dense(f, k, name, device)
            for t in taus:
                t.sub_(ref)
            base_f = ref if base_f is None else base_f.add_(ref)
        return base_f, taus

    def model_files_dir(self) -> Path | None:
        return self.base_dir

    def close(self) -> None:
        if self.base is not None:
            self.base.close()


def merge_lora_deltas(adapter_dirs: Sequence[str | Path], out_dir: str | Path, method: str, *,
                      base_dir: str | Path | None = None, reference: str | Path | None = None,
                      out_dtype: torch.dtype = torch.float32, **kwargs) -> Path:
    """Merge the dense deltas ``κ_i B_i A_i`` of adapters on one W_sft, module by module (module docstring).

    With ``base_dir`` the output is the full checkpoint ``W_sft + D_ref + Δ``; without, a delta checkpoint of
    ``D_ref + Δ`` in ``out_dtype``. Keyword arguments are those of :func:`.stream.stream_merge` (scope, device,
    max_shard_size, dry_run, …) and the operator's parameters."""
    inputs = LoraDeltaInputs(adapter_dirs, base_dir=base_dir, reference=reference, out_dtype=out_dtype)
    provenance = {"space": "dense_delta", "adapters": [str(d) for d in adapter_dirs],
                  "reference": str(reference) if reference is not None else None,
                  "base": str(base_dir) if base_dir is not None else None}
    return stream_merge(inputs, out_dir, method, provenance=provenance, **kwargs)
