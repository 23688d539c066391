"""The tiny models' one training loop (the tiny Llama's pretraining and the tiny moderation judge)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from ..train.guards import check_finite_loss


def train_loop(model, batches: Iterable[Mapping[str, torch.Tensor]], optimizer, scheduler, what: str,
               on_step: Callable[[list[float]], None] | None = None) -> list[float]:
    """Train ``model`` on ``batches`` (keyword inputs of its forward, ``labels`` included): per batch the loss, a
    finiteness check, backward, gradient clipping to norm 1, an optimizer and a scheduler step; ``on_step`` sees the
    loss curve after each step. Returns the loss curve; the model is left in eval mode."""
    model.train()
    losses: list[float] = []
    for batch in batches:
        loss = model(**batch).loss
        check_finite_loss(loss, what, len(losses) + 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(losses)
    model.eval()
    return losses
