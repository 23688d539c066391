"""Running activation statistics of every LoRA matrix, in one pass (DESIGN.md §5; spec nlsr.md §4.2, §4.6).

What is accumulated, per LoRA module, over the **statistic positions** of every calibration batch:

* ``input_sumsq[j] = Σ_t x_{t,j}²`` of the module input ``x`` (the input of ``lora_A``; Wanda's ``‖X_{:,j}‖²``);
* ``output_sumsq[j] = Σ_t z_{t,j}²`` of ``z = A x`` (the unscaled output of ``lora_A`` = the input of ``lora_B``);
* ``gram = Σ_t z_t z_tᵀ = ZᵀZ`` (r × r), from which both principal output directions follow (spec §4.6):
  for ``A``, ``(X Aᵀ)ᵀ(X Aᵀ) = A XᵀX Aᵀ = ZᵀZ``; for ``B``, ``(Z Bᵀ)ᵀ(Z Bᵀ) = B (ZᵀZ) Bᵀ``.
  So one r × r Gram per module serves both matrices, costs ``r²`` per token, and never forms the
  ``d_in × d_in`` input Gram nor the ``d_out × d_out`` output Gram.

Memory is fixed (a few vectors and one r × r matrix per module), whatever the amount of data.

**Statistic positions** (:func:`statistic_positions`): ``"response"`` (default) = the positions whose label is a
response token (``labels != -100``: the response tokens themselves, EOS included), exactly what the reference code
records (``target != -100``, spec §4.1-4.2); ``"predicting"`` = the positions whose *next* label is a response
token (the last prompt token … the second-to-last response token: the positions the LM loss scores).

Two drivers, both a single sequential pass over the layers (never a full forward per layer):

* :func:`collect_lora_statistics` (default) — forward hooks on the ``lora_A`` linears, one ``no_grad`` forward
  of the decoder stack per batch (no LM head). Statistics are those of the reference model as it is. Cost: one
  forward without the head, plus a gather of the statistic rows (index computed once per batch and shared by all
  modules; q/k/v and gate/up share one gathered input) and an ``addmm`` of ``T_resp × r`` rows per module.
* :func:`layerwise_pass` (``propagate=True``) — Wanda's layer-by-layer calibration: the inputs of decoder layer 0
  are captured for every batch and kept; layer ``i`` runs on them with hooks, a callback modifies layer ``i``
  (the reference code zeroes pruned entries / writes the projected LoRA), and layer ``i``'s outputs under the
  modified weights become layer ``i+1``'s inputs. This reproduces the reference code's propagation through
  already-processed layers; memory holds every batch's hidden state (as Wanda does). Every LoRA weight is
  restored afterwards: the caller's model is never left modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..progress import bar
from .lora import decoder_layers, layer_index, lora_modules

POSITIONS = ("response", "predicting")


def progress(iterable: Iterable, desc: str, total: int | None = None, enabled: bool = True) -> Iterator:
    """Iterate with a progress bar (nlsr_lib.progress decides whether it shows)."""
    return iter(bar(iterable, desc, total=total, enabled=enabled))


def statistic_positions(labels: torch.Tensor, mode: str = "response") -> torch.Tensor:
    """Bool ``(batch, seq)`` mask of the positions whose activations enter the statistics (module docstring)."""
    if mode not in POSITIONS:
        raise ValueError(f"unknown positions {mode!r}; allowed: {', '.join(POSITIONS)}")
    response = labels != -100
    if mode == "response":
        return response
    out = torch.zeros_like(response)
    out[:, :-1] = response[:, 1:]
    return out


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class ModuleStats:
    """Running sums of one LoRA module over the statistic positions (fp64 vectors, fp32 Gram)."""

    tokens: int = 0
    input_sumsq: torch.Tensor | None = None  # (d_in,)
    output_sumsq: torch.Tensor | None = None  # (r,)
    gram: torch.Tensor | None = None  # (r, r)


@dataclass
class _Collector:
    """Forward hooks on the ``lora_A`` linears of ``modules`` (name → LoraLayer)."""

    modules: Mapping[str, torch.nn.Module]
    input_sumsq: bool = False
    output_sumsq: bool = False
    gram: bool = False
    stats: dict[str, ModuleStats] = field(default_factory=dict)
    _index: torch.Tensor | None = None
    _last: tuple | None = None
    _handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, layer in self.modules.items():
            if getattr(layer, "merged", False):
                raise ValueError(f"LoRA module {name} is merged into its base weight; unmerge it before scoring")
            (adapter,) = layer.active_adapters
            self.stats[name] = ModuleStats()
            self._handles.append(layer.lora_A[adapter].register_forward_hook(self._hook(name)))

    def begin_batch(self, positions: torch.Tensor) -> None:
        """Set the statistic positions of the next forward (flat row index, computed once per batch)."""
        self._index = positions.reshape(-1).nonzero().squeeze(1)
        self._last = None

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).index_select(0, self._index.to(t.device)).float()

    def _input_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gathered rows (and their column sums of squares) of a module input; q/k/v and gate/up receive the same
        tensor object, so the last one is cached by identity (the cache holds a reference, so no address reuse)."""
        if self._last is None or self._last[0] is not x:
            rows = self._rows(x)
            self._last = (x, rows, rows.square().sum(0).double())
        return self._last[1], self._last[2]

    def _hook(self, name: str) -> Callable:
        def hook(_module, inputs, output):
            if self._index is None:
                raise RuntimeError("statistics hook fired outside a calibration batch")
            st = self.stats[name]
            st.tokens += int(self._index.numel())
            if self.input_sumsq:
                s = self._input_rows(inputs[0])[1]
                st.input_sumsq = s.clone() if st.input_sumsq is None else st.input_sumsq.add_(s)
            z = self._rows(output) if (self.output_sumsq or self.gram) else None
            if self.output_sumsq:
                s = z.square().sum(0).double()
                st.output_sumsq = s if st.output_sumsq is None else st.output_sumsq.add_(s)
            if self.gram:
                if st.gram is None:
                    st.gram = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float32, device=z.device)
                st.gram.addmm_(z.T, z)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._index = None
        self._last = None


def _decoder_forward(model: torch.nn.Module) -> Callable:
    """The decoder stack without the LM head (``get_decoder()``), else the whole model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


class _EvalMode:
    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def collect_lora_statistics(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                            positions: str = "response", input_sumsq: bool = False, output_sumsq: bool = False,
                            gram: bool = False, show_progress: bool = True, desc: str = "statistics",
                            ) -> dict[str, ModuleStats]:
    """One ``no_grad`` forward per batch with hooks: running statistics of every LoRA module (module docstring).

    ``batches``: dicts with ``input_ids``, ``attention_mask``, ``labels`` (−100 on prompt and padding)."""
    modules = dict(lora_modules(model))
    collector = _Collector(modules, input_sumsq=input_sumsq, output_sumsq=output_sumsq, gram=gram)
    forward = _decoder_forward(model)
    device = input_device(model)
    try:
        with torch.no_grad(), _EvalMode(model):
            for batch in progress(batches, desc, enabled=show_progress):
                batch = to_device(batch, device)
                collector.begin_batch(statistic_positions(batch["labels"], positions))
                forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        collector.remove()
    if all(st.tokens == 0 for st in collector.stats.values()):
        raise ValueError("the calibration batches contain no statistic positions (every label is -100)")
    return collector.stats


class _StopForward(Exception):
    pass


def _capture_layer_inputs(model: torch.nn.Module, layers: torch.nn.ModuleList, batches, positions: str,
                          show_progress: bool) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    """(hidden states, layer kwargs, statistic positions) entering decoder layer 0, per batch."""
    captured: list = []

    def pre_hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items()}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    forward, device, out = _decoder_forward(model), input_device(model), []
    try:
        for batch in progress(batches, "layer-0 inputs", enabled=show_progress):
            batch = to_device(batch, device)
            try:
                forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            except _StopForward:
                pass
            hidden, kwargs = captured.pop()
            out.append((hidden, kwargs, statistic_positions(batch["labels"], positions)))
    finally:
        handle.remove()
    return out


def _run_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def layerwise_pass(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                   on_layer: Callable[[int, dict[str, ModuleStats]], bool], *, positions: str = "response",
                   input_sumsq: bool = False, output_sumsq: bool = False, gram: bool = False,
                   show_progress: bool = True, desc: str = "layers") -> None:
    """Wanda-style sequential calibration (module docstring). ``on_layer(i, stats)`` receives the statistics of
    decoder layer ``i``'s LoRA modules and may modify that layer's LoRA weights in place; it returns True if it did
    (then layer ``i`` is re-run to produce layer ``i+1``'s inputs). All LoRA weights are restored at the end."""
    layers = decoder_layers(model)
    modules = dict(lora_modules(model))
    by_layer: dict[int, dict[str, torch.nn.Module]] = {}
    for name, module in modules.items():
        by_layer.setdefault(layer_index(name), {})[name] = module
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    params = dict(model.named_parameters())
    try:
        with torch.no_grad(), _EvalMode(model):
            states = _capture_layer_inputs(model, layers, batches, positions, show_progress)
            if not any(bool(pos.any()) for _, _, pos in states):
                raise ValueError("the calibration batches contain no statistic positions (every label is -100)")
            for i in progress(range(len(layers)), desc, enabled=show_progress):
                layer = layers[i]
                collector = _Collector(by_layer.get(i, {}), input_sumsq=input_sumsq, output_sumsq=output_sumsq,
                                       gram=gram)
                outputs = []
                try:
                    for hidden, kwargs, pos in states:
                        collector.begin_batch(pos)
                        outputs.append(_run_layer(layer, hidden, kwargs))
                finally:
                    collector.remove()
                modified = on_layer(i, collector.stats) if collector.stats else False
                if modified:
                    outputs = [_run_layer(layer, hidden, kwargs) for hidden, kwargs, _ in states]
                states = [(out, kwargs, pos) for out, (_, kwargs, pos) in zip(outputs, states)]
    finally:
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)
