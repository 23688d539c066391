"""Streaming merges: one tensor at a time from disk to disk (DESIGN.md §5; spec/merging.md §4.3, §5.1).

:func:`stream_merge` runs any registered operator over a :class:`MergeInputs` — full-weight checkpoints relative to
a base (:class:`CheckpointInputs`) or dense LoRA deltas (:class:`.lora.LoraDeltaInputs`) — and writes sharded
safetensors with an HF index that ``AutoModelForCausalLM.from_pretrained`` loads.

Per output tensor ``k``: read ``θ_base[k]`` and every ``θ_i[k]`` (stored dtype), move them to ``device``, compute
``τ_i = θ_i − θ_base`` and ``Δ = Merge(τ)`` in fp32, write ``(θ_base + Δ)`` cast to the stored dtype. Tensors that
are not floating point are copied from the base. The next tensor is read by a background thread while the current
one is computed (``prefetch``).

Memory: the working set of the largest tensor, about ``numel × (4·(n + b) + 2s)`` bytes for ``n`` task vectors,
``b`` fp32-sized operator buffers (:data:`BUFFERS`) and stored element size ``s`` (the base and the output); each
input is freed as soon as it is converted to fp32, and the next tensor is prefetched only while that stays below
the largest working set. Never a shard, never a model.

Passes: every method reads each input once, except TIES / Consensus TIES with ``scope="global"``: the threshold
is the ``⌊density·D⌋``-th largest ``|τ_i|`` over the whole model, found exactly by a radix select
(:class:`.select.RadixSelect`) that needs two statistics passes (high-bit then low-bit histograms) before the
merge pass — **three reads of every input** instead of one, and ``n × 0.8 MB`` of histograms. Scope ``tensor``
(mergekit's and PEFT's choice) needs one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..counts import kept_by_density
from ..progress import bar as progress_bar
from .layout import LayoutError, TensorMeta, check_same_layout
from .operators import check_params, get_merge, merge_tensors, param_default
from .safetensors_io import CheckpointReader, ShardedWriter, copy_model_files
from .select import RadixSelect

BUFFERS = {"weight_averaging": 1, "task_arithmetic": 1, "ties": 3, "dare": 3, "consensus_ta": 4,
           "consensus_ties": 6}  # fp32-sized buffers beside the n task vectors (ties: accumulator, sign, count + bool)
PROVENANCE = "nlsr_merge.json"


class MergeInputs(ABC):
    """What a streaming merge reads. Subclasses define the output plan and how to load one key."""

    n_tasks: int

    @abstractmethod
    def plan(self) -> list[TensorMeta]:
        """Output tensors in write order (name, shape, stored dtype)."""
        ...

    @abstractmethod
    def merged(self, name: str) -> bool:
        """Whether ``name`` is merged (else it is copied from the base)."""
        ...

    @abstractmethod
    def bytes_read(self, name: str) -> int:
        ...

    @abstractmethod
    def load(self, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
        """CPU tensors for ``name``: (base in its stored dtype or None for a zero base, a list of the inputs the
        task vectors are computed from, or None when ``name`` is copied from the base)."""
        ...

    @abstractmethod
    def task_vectors(self, name: str, loaded, device: torch.device) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(the base on ``device`` — any float dtype, added in fp32 — or None, the fp32 task vectors on ``device``)
        from :meth:`load`'s result; empties its list of inputs so that they are freed as soon as converted."""
        ...

    def model_files_dir(self) -> Path | None:
        return None

    def close(self) -> None:
        pass


def check_finite(name: str, taus: Sequence[torch.Tensor], sources: Sequence[str]) -> None:
    """Refuse NaN/inf weights (DESIGN.md §7): a non-finite task vector names the tensor and its inputs."""
    for i, tau in enumerate(taus):  # amax/amin propagate NaN and ±inf without a temporary
        if tau.numel() and not (bool(torch.isfinite(tau.amax())) and bool(torch.isfinite(tau.amin()))):
            raise ValueError(f"tensor {name}: NaN or inf in task vector {i} (inputs {', '.join(sources)})")


class CheckpointInputs(MergeInputs):
    """Full-weight checkpoints ``θ_1 … θ_n`` relative to a base checkpoint ``θ_base`` (same keys, shapes, dtypes)."""

    def __init__(self, base_dir: str | Path, model_dirs: Sequence[str | Path]):
        if not model_dirs:
            raise ValueError("CheckpointInputs: no models to merge")
        self.base_dir = Path(base_dir)
        self.base = CheckpointReader(base_dir)
        self.models = [CheckpointReader(d) for d in model_dirs]
        for d, m in zip(model_dirs, self.models):
            check_same_layout(self.base.meta, m.meta, f"base {base_dir}", f"model {d}")
        self.n_tasks = len(self.models)

    def plan(self) -> list[TensorMeta]:
        return list(self.base.meta.values())

    def merged(self, name: str) -> bool:
        return self.base.meta[name].dtype.is_floating_point

    def bytes_read(self, name: str) -> int:
        return self.base.nbytes(name) * (1 + (self.n_tasks if self.merged(name) else 0))

    def load(self, name):
        base = self.base.read(name)
        if not self.merged(name):
            return base, None
        return base, [m.read(name) for m in self.models]

    def task_vectors(self, name, loaded, device):
        base, models = loaded
        base = base.to(device, non_blocking=True)
        base_f = base.float()
        taus = []
        while models:  # τ_i = float(θ_i) − float(θ_base); each θ_i is freed once converted
            taus.append(models.pop(0).to(device, non_blocking=True).float().sub_(base_f))
        check_finite(name, taus, [str(self.base_dir)] + [str(m.path) for m in self.models])
        return base, taus

    def model_files_dir(self) -> Path:
        return self.base_dir

    def close(self) -> None:
        self.base.close()
        for m in self.models:
            m.close()


class DeltaCheckpointInputs(MergeInputs):
    """A base checkpoint plus a delta checkpoint (keys ⊆ the base's): the single task vector is the delta."""

    def __init__(self, base_dir: str | Path, delta_dir: str | Path):
        self.base_dir = Path(base_dir)
        self.base = CheckpointReader(base_dir)
        self.delta = CheckpointReader(delta_dir)
        for name, meta in self.delta.meta.items():
            if name not in self.base.meta:
                raise LayoutError(f"delta tensor {name} of {delta_dir} is not a weight of the base {base_dir}")
            if tuple(meta.shape) != tuple(self.base.meta[name].shape):
                raise LayoutError(f"tensor {name}: shape {tuple(self.base.meta[name].shape)} in the base but "
                                  f"{tuple(meta.shape)} in the delta {delta_dir}")
        self.n_tasks = 1

    def plan(self) -> list[TensorMeta]:
        return list(self.base.meta.values())

    def merged(self, name: str) -> bool:
        return name in self.delta.meta

    def bytes_read(self, name: str) -> int:
        return self.base.nbytes(name) + (self.delta.nbytes(name) if self.merged(name) else 0)

    def load(self, name):
        base = self.base.read(name)
        return base, ([self.delta.read(name)] if self.merged(name) else None)

    def task_vectors(self, name, loaded, device):
        base, deltas = loaded
        taus = [deltas.pop().to(device).float()]
        check_finite(name, taus, [str(self.delta.path)])
        return base.to(device), taus

    def model_files_dir(self) -> Path:
        return self.base_dir

    def close(self) -> None:
        self.base.close()
        self.delta.close()


@dataclass
class MergePlan:
    """What a streaming merge will do (the dry run prints it)."""

    method: str
    scope: str
    n_tasks: int
    n_tensors: int
    n_parameters: int
    passes: int
    bytes_read: int
    bytes_written: int
    n_shards: int
    peak_bytes: int
    largest: str
    device: str
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        gb = 1e9
        lines = [
            f"merge {self.method} (trimming scope {self.scope}) of {self.n_tasks} task vector(s): "
            f"{self.n_tensors} tensors, {self.n_parameters / 1e9:.3f} B parameters, compute on {self.device}",
            f"  read : {self.bytes_read / gb:.2f} GB ({self.passes} pass{'es' if self.passes > 1 else ''} over the "
            f"inputs)",
            f"  write: {self.bytes_written / gb:.2f} GB in {self.n_shards} shard(s)",
            f"  peak memory: about {self.peak_bytes / gb:.2f} GB beyond the interpreter (largest tensor "
            f"{self.largest})",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def working_bytes(inputs: MergeInputs, meta: TensorMeta, method: str) -> int:
    """Bytes held while ``meta`` is merged: fp32 task vectors and buffers, the stored base and output."""
    if not inputs.merged(meta.name):
        return meta.nbytes * 2
    s = meta.nbytes // max(meta.numel, 1)
    return meta.numel * (4 * (inputs.n_tasks + BUFFERS[method]) + 2 * s)


def plan_merge(inputs: MergeInputs, method: str, *, scope: str = "tensor", max_shard_size: int = 5_000_000_000,
               device: str = "cpu") -> MergePlan:
    """Bytes to read and write and the peak working memory of :func:`stream_merge` (no tensor is read)."""
    from .safetensors_io import plan_shards

    spec = get_merge(method)
    metas = inputs.plan()
    merged = [m for m in metas if inputs.merged(m.name)]
    passes = 3 if spec.trims and scope == "global" else 1
    read_merge = sum(inputs.bytes_read(m.name) for m in metas)
    read_stats = sum(inputs.bytes_read(m.name) for m in merged) * (passes - 1)
    n = inputs.n_tasks
    work = {m.name: working_bytes(inputs, m, method) for m in metas}
    largest = max(work, key=work.get) if work else "-"
    peak = work.get(largest, 0)
    if spec.trims and scope == "global":
        peak += n * (RadixSelect().coarse.numel() + RadixSelect().fine.numel()) * 8
    notes = []
    if device != "cpu":
        notes.append(f"the fp32 working set lives on {device}; host memory holds the stored-dtype tensors")
    if passes == 3:
        notes.append("global trimming: two radix-select statistics passes, then the merge pass")
    return MergePlan(method, scope, n, len(metas), sum(m.numel for m in metas), passes, read_merge + read_stats,
                     sum(m.nbytes for m in metas), len(plan_shards(metas, max_shard_size)), peak, largest, device,
                     notes)


def _prefetched(inputs: MergeInputs, names: list[str], enabled: bool,
                work: dict[str, int] | None = None) -> Iterator[tuple[str, object]]:
    """``(name, inputs.load(name))`` in order; the next tensor is read by a background thread while the current
    one is merged, unless that would raise the peak (``work[current] + bytes(next) > max(work)``)."""
    if not enabled:
        for name in names:
            yield name, inputs.load(name)
        return
    budget = max(work.values()) if work else 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = None
        for i, name in enumerate(names):
            loaded = future.result() if future is not None else inputs.load(name)
            future = None
            if i + 1 < len(names) and (work is None or work[name] + inputs.bytes_read(names[i + 1]) <= budget):
                future = pool.submit(inputs.load, names[i + 1])
            yield name, loaded
            del loaded


def stream_global_thresholds(inputs: MergeInputs, density: float, device: str = "cpu",
                             progress: bool = True) -> list[float | None]:
    """Per task, the exact ``⌊density·D⌋``-th largest ``|τ_i|`` over every merged tensor (two streaming passes)."""
    dev = torch.device(device)
    names = [m.name for m in inputs.plan() if inputs.merged(m.name)]
    total = sum(m.numel for m in inputs.plan() if inputs.merged(m.name))
    k = kept_by_density(total, density)
    if k >= total:
        return [None] * inputs.n_tasks
    selects = [RadixSelect() for _ in range(inputs.n_tasks)]

    def sweep(fine: bool) -> None:
        bar = progress_bar(names, desc=f"global threshold ({'fine' if fine else 'coarse'})", enabled=progress,
                           unit="tensor")
        for name in bar:
            _, taus = inputs.task_vectors(name, inputs.load(name), dev)
            for sel, tau in zip(selects, taus):
                (sel.add_fine if fine else sel.add_coarse)(tau.abs_())
            del taus

    sweep(False)
    for sel in selects:
        sel.locate(k)
    if any(sel.needs_fine for sel in selects):
        sweep(True)
    return [sel.value() for sel in selects]


def stream_merge(inputs: MergeInputs, out_dir: str | Path, method: str, *, scope: str = "tensor",
                 single_task_identity: bool = False, device: str = "cpu", max_shard_size: int = 5_000_000_000,
                 dry_run: bool = False, overwrite: bool = False, prefetch: bool = True, progress: bool = True,
                 provenance: dict | None = None, **params) -> MergePlan | Path:
    """Merge ``inputs`` with ``method`` into ``out_dir`` tensor by tensor (module docstring).

    ``dry_run`` prints :func:`plan_merge`'s report and returns the plan without reading any tensor. Returns the
    output directory, which holds the shards, the index, the base's config/tokenizer files and
    ``nlsr_merge.json`` (method, parameters, inputs)."""
    from .inmemory import SCOPES

    try:
        if scope not in SCOPES:
            raise ValueError(f"unknown trimming scope {scope!r}; allowed: {', '.join(SCOPES)}")
        check_params(method, params)
        plan = plan_merge(inputs, method, scope=scope, max_shard_size=max_shard_size, device=device)
        if dry_run:
            print(plan.report())
            return plan
        return _run(inputs, Path(out_dir), method, scope, single_task_identity, torch.device(device), max_shard_size,
                    overwrite, prefetch, progress, provenance, params)
    finally:
        inputs.close()


def _run(inputs: MergeInputs, out_dir: Path, method: str, scope: str, single_task_identity: bool,
         dev: torch.device, max_shard_size: int, overwrite: bool, prefetch: bool, progress: bool,
         provenance: dict | None, params: dict) -> Path:
    thresholds = None
    if get_merge(method).trims and scope == "global":
        density = params.get("density", param_default(method, "density"))
        thresholds = stream_global_thresholds(inputs, density, str(dev), progress)
    record = {"method": method, "scope": scope, "single_task_identity": single_task_identity,
              "params": params, **(provenance or {})}
    metas = inputs.plan()
    dtypes = {m.name: m.dtype for m in metas}
    work = {m.name: working_bytes(inputs, m, method) for m in metas}
    writer = ShardedWriter(out_dir, metas, max_shard_size, {"nlsr_merge": json.dumps(record, default=str)},
                           overwrite=overwrite)
    try:
        names = [m.name for m in metas]
        with progress_bar(total=len(names), desc=f"merge {method}", enabled=progress, unit="tensor") as bar:
            for name, loaded in _prefetched(inputs, names, prefetch, work):
                base, models = loaded
                if models is None:
                    writer.write(name, base)
                else:
                    base_dev, taus = inputs.task_vectors(name, loaded, dev)
                    delta = merge_tensors(method, taus, key=name, thresholds=thresholds,
                                          single_task_identity=single_task_identity, inplace=True, **params)
                    del taus
                    if base_dev is not None:
                        delta.add_(base_dev.float())
                    del base_dev
                    writer.write(name, delta.to(dtypes[name]))
                    del delta
                del loaded, base, models
                bar.update(1)
        files_dir = inputs.model_files_dir()
        if files_dir is not None:
            copy_model_files(files_dir, writer.tmp_dir)
        (writer.tmp_dir / PROVENANCE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def merge_checkpoints(base_dir: str | Path, model_dirs: Sequence[str | Path], out_dir: str | Path, method: str,
                      **kwargs) -> MergePlan | Path:
    """Stream-merge full-weight checkpoints relative to ``base_dir``: ``θ_base + Merge({θ_i − θ_base})``.

    Keyword arguments are those of :func:`stream_merge` and the operator's parameters."""
    inputs = CheckpointInputs(base_dir, model_dirs)
    provenance = {"base": str(base_dir), "models": [str(d) for d in model_dirs]}
    return stream_merge(inputs, out_dir, method, provenance=provenance, **kwargs)


def apply_delta_checkpoint(base_dir: str | Path, delta_dir: str | Path, out_dir: str | Path, *, scale: float = 1.0,
                           **kwargs) -> MergePlan | Path:
    """``θ_base + scale · Δ`` streamed into a full checkpoint (``Δ`` from a delta checkpoint, e.g.
    :func:`.lora.merge_lora_deltas` without a base). Keyword arguments are those of :func:`stream_merge`."""
    inputs = DeltaCheckpointInputs(base_dir, delta_dir)
    provenance = {"base": str(base_dir), "delta": str(delta_dir)}
    return stream_merge(inputs, out_dir, "task_arithmetic", lam=scale, provenance=provenance, **kwargs)
