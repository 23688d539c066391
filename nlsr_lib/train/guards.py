"""No silent NaN in training: every training loop of the project stops on a non-finite loss, by name.

:func:`check_finite_loss` is the one check; the loops call it on each step's loss (the tiny pretraining, the tiny
moderation judge, the learned safety mask) and :func:`finite_loss_callback` applies it to the losses a
transformers/trl trainer logs (alignment). The error names what was training, the step and the value, so a
diverged run says so instead of saving an adapter of NaN weights that evaluates to empty generations.
"""

from __future__ import annotations

import math


def check_finite_loss(loss, where: str, step: int) -> float:
    """``float(loss)`` (a number or a one-element tensor), or ``FloatingPointError`` naming ``where`` (what is
    training), ``step`` (the 1-based optimizer step) and the value when it is NaN or ±inf."""
    value = float(loss.detach() if hasattr(loss, "detach") else loss)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{where}: non-finite training loss {value} at step {step}; training stopped (lower the learning rate, "
            "check the data and the dtype)")
    return value


def finite_loss_callback(where: str):
    """A ``transformers.TrainerCallback`` that applies :func:`check_finite_loss` to every logged ``loss`` (the mean
    over the logging window) and to the final ``train_loss``. The trainer must log non-finite losses as they are
    (``logging_nan_inf_filter=False``): by default transformers leaves NaN/inf steps out of the logged mean."""
    from transformers import TrainerCallback

    class FiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "train_loss"):
                if logs and key in logs:
                    check_finite_loss(logs[key], f"{where} ({key})", state.global_step)

    return FiniteLoss()
