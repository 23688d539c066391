"""The field's training defences as :class:`~nlsr_lib.train.alignment.AlignmentMethod` variants (spec/defences.md).

Each function returns the method ``train_adapter`` runs with the defence's trainer in place of trl's, so a defended
training is the same code path as the undefended one (same arguments, batches, dtype, adapter saving):

* :func:`vaccine_method` (alignment stage, §1): the method's trainer with the Vaccine step (SFT or DPO, D-V4);
* :func:`booster_method` (alignment stage, §2): SFT with the Booster step on a preference method's data, f on the
  chosen answers and h on the rejected answers to the same prompts (D-B5);
* :func:`lisa_method` (fine-tuning stage, §3): SFT alternating the user's data with the guide data;
* :func:`constrained_sft_method` (fine-tuning stage, §5): SFT with the token-wise constrained loss.

Hyperparameters come from a ``defences.<name>`` section of the params (:mod:`nlsr_lib.config`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from ..errors import UsageError
from .alignment import AlignmentMethod, get_method

VACCINE_TRAINERS = {"sft": "VaccineSFTTrainer", "dpo": "VaccineDPOTrainer"}
BOOSTER_METHODS = ("dpo", "orpo", "simpo")  # their rows are (prompt, chosen, rejected) pairs


def _with_trainer(method: AlignmentMethod, name: str, trainer) -> AlignmentMethod:
    return dataclasses.replace(method, name=f"{method.name}+{name}", trainer=trainer)


def vaccine_method(method: str, rho: float, site: str) -> AlignmentMethod:
    """``method`` (``sft`` or ``dpo``) trained with the Vaccine step of size ``rho`` at ``site`` (spec §1)."""
    from . import vaccine

    if method not in VACCINE_TRAINERS:
        raise UsageError(f"vaccine: alignment method {method!r} has no Vaccine trainer; allowed: "
                         f"{', '.join(VACCINE_TRAINERS)} (spec/defences.md §1: SFT, or DPO in the NLSR harness)")
    vaccine.check_rho(rho), vaccine.check_site(site)
    spec = get_method(method)

    def trainer():
        _, config_cls, config_kwargs = spec.trainer()
        return partial(getattr(vaccine, VACCINE_TRAINERS[method]), rho=rho, site=site), config_cls, config_kwargs

    return _with_trainer(spec, "vaccine", trainer)


def booster_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Preference rows → (f rows: prompt + chosen, h rows: prompt + rejected), the code's pairing (D-B5)."""
    missing = [key for key in ("prompt", "chosen", "rejected") if rows and key not in rows[0]]
    if missing:
        raise UsageError(f"booster: alignment rows lack {', '.join(missing)}; Booster needs preference pairs (one "
                         "safe, one harmful answer per prompt)")
    align = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    harmful = [{"prompt": r["prompt"], "completion": r["rejected"]} for r in rows]
    return align, harmful


def booster_method(method: str, harmful_rows: list[dict], lam: float, alpha: float,
                   harmful_batch_size: int = 0) -> AlignmentMethod:
    """SFT with the Booster step (spec §2) in place of preference ``method``: h on ``harmful_rows``
    (prompt/completion), λ = ``lam``, α = ``alpha``, ``harmful_batch_size`` 0 = the alignment batch (D-B4)."""
    from . import booster

    if method not in BOOSTER_METHODS:
        raise UsageError(f"booster: alignment method {method!r} has no harmful answers to pair with its safe ones; "
                         f"allowed: {', '.join(BOOSTER_METHODS)} (preference pairs, spec/defences.md §2 D-B5)")
    booster.check_lambda(lam), booster.check_alpha(alpha)
    sft = get_method("sft")

    def trainer():
        _, config_cls, config_kwargs = sft.trainer()
        return (partial(booster.__getattr__("BoosterSFTTrainer"), harmful_dataset=harmful_rows, lam=lam, alpha=alpha,
                        harmful_batch_size=harmful_batch_size or None), config_cls, config_kwargs)

    return dataclasses.replace(sft, name=f"{method}+booster", trainer=trainer, on_sft_base=True)


def lisa_method(guide_rows: list[dict], **hyperparameters: Any) -> AlignmentMethod:
    """The attack's SFT with Lisa's bi-state optimisation on ``guide_rows`` (spec §3)."""
    from . import lisa

    lisa.trainer_factory(guide_rows, **hyperparameters)  # refuses bad hyperparameters now, not at training time
    return _with_trainer(get_method("sft"), "lisa", lambda: lisa.trainer_factory(guide_rows, **hyperparameters))


def constrained_sft_method(**hyperparameters: Any) -> AlignmentMethod:
    """The attack's SFT with the token-wise constrained loss against the adapter it starts from (spec §5)."""
    from . import constrained_sft

    constrained_sft.trainer_factory(**hyperparameters)
    return _with_trainer(get_method("sft"), "constrained_sft",
                         lambda: constrained_sft.trainer_factory(**hyperparameters))


__all__ = ["booster_method", "booster_rows", "constrained_sft_method", "lisa_method", "vaccine_method"]
