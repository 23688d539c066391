"""Training stages: alignment (SFT, DPO, ORPO, KTO, SimPO) through trl, with LoRA."""

from .alignment import ALIGNMENT_METHODS, AlignmentMethod, train_adapter

__all__ = ["ALIGNMENT_METHODS", "AlignmentMethod", "train_adapter"]
