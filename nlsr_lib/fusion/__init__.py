"""Model fusion (DESIGN.md §1-2 notebook 06, §5; spec/somf.md §3; spec/merging.md).

* :mod:`.operators` — the merge operators in a registry (weight averaging, task arithmetic, TIES, DARE,
  Consensus TA / TIES), pure functions on lists of fp32 tensors of one key;
* :mod:`.select` — exact magnitude thresholds by selection (per tensor) and radix select (whole model);
* :mod:`.inmemory` — task vectors and merges of state dicts in memory (the reference semantics);
* :mod:`.lora` — LoRA adapters: factor-space merges relative to the aligned adapter, dense ``κ·B·A`` merges;
* :mod:`.stream` / :mod:`.safetensors_io` — streaming merges of full checkpoints, sharded safetensors in and out;
* :mod:`.regions` — fusion inside safety regions (neuron, rank, attention-head level).
"""

from .inmemory import SCOPES, apply_delta, global_thresholds, merge_state_dicts, merge_task_vectors, task_vectors
from .layout import LayoutError, TensorMeta
from .lora import LoraDeltaInputs, merge_adapter_states, merge_adapters, merge_lora_deltas, module_weight_name
from .operators import (
    DISJOINT_MODES, MERGE_METHODS, MergeMethod, get_merge, merge_tensors, method_params, register_merge, tensor_seed,
)
from .regions import (
    fuse_heads, fuse_neurons, fuse_ranks, head_masks, head_scores, project, restrict_to_mask, select_heads,
)
from .safetensors_io import CheckpointReader, ShardedWriter, copy_model_files
from .select import RadixSelect, kth_largest, magnitude_threshold
from .stream import (
    CheckpointInputs, DeltaCheckpointInputs, MergeInputs, MergePlan, apply_delta_checkpoint, merge_checkpoints,
    plan_merge, stream_merge,
)

__all__ = [
    "SCOPES", "apply_delta", "global_thresholds", "merge_state_dicts", "merge_task_vectors", "task_vectors",
    "LayoutError", "TensorMeta", "LoraDeltaInputs", "merge_adapter_states", "merge_adapters", "merge_lora_deltas",
    "module_weight_name", "DISJOINT_MODES", "MERGE_METHODS", "MergeMethod", "get_merge", "merge_tensors",
    "method_params", "register_merge", "tensor_seed", "fuse_heads", "fuse_neurons", "fuse_ranks", "head_masks",
    "head_scores", "project", "restrict_to_mask", "select_heads", "CheckpointReader", "ShardedWriter",
    "copy_model_files", "RadixSelect", "kth_largest", "magnitude_threshold", "CheckpointInputs",
    "DeltaCheckpointInputs", "MergeInputs", "MergePlan", "apply_delta_checkpoint", "merge_checkpoints", "plan_merge",
    "stream_merge",
]
