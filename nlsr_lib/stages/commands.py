"""``nlsr stage run NAME key=value …``: every stage kind from the command line.

Arguments are the stage's own (``method=dpo``, ``task=sst2``, ``p=0.1``, ...); a model under test is named by
``model=`` in a short form (:func:`model_from_spec`)::

    base | sft | <method>                 the base, W_sft, an aligned adapter (notebook 01)
    aligned:<method>                      an aligned adapter over its base (the attack's start; ``unaligned`` too)
    attack:<method>:<task>:<p>[:<n>]      an attacked adapter (notebook 02)
    expo:<method>:<alpha>                 an EXPO candidate (notebook 03)
    reference:<method>                    the safety reference (notebook 03)
    restore:<defence>:<method>:<task>:<p> a defended adapter (notebook 05)
    fusion:<name>:<task>[+<task>…]        a fused adapter (notebook 06)

The calibration and mask stages take ``reference=<method>`` (its EXPO safety reference; ``plain=true`` for the
aligned adapter) or any ``model=``; the restore stage ``defence= method= task= p=``; the fusion stages
``tasks=<task>[+<task>…]`` (and ``name=`` for ``fusion``). A dotted key (``attack.n=200``) overrides that params
field for this command.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import yaml

from ..config import Params
from ..errors import NlsrError, UsageError
from ..runs import Run
from .graph import STAGES, ModelRef

MODEL_FORMS = ("base", "sft", "<method>", "aligned:<method>", "attack:<method>:<task>:<p>[:<n>]",
               "expo:<method>:<alpha>", "reference:<method>", "restore:<defence>:<method>:<task>:<p>",
               "fusion:<name>:<task>[+<task>...]")


def parse_pairs(pairs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` words → (stage arguments, dotted params overrides); values are read as YAML scalars."""
    args, overrides = {}, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"stage argument {pair!r}: expected key=value (e.g. method=dpo, p=0.1, attack.n=200)")
        parsed = yaml.safe_load(value) if value else ""
        (overrides if "." in key else args)[key] = value if key in ("model", "tasks", "reference") else parsed
    return args, overrides


def model_from_spec(params: Params, run: Run, spec: str) -> ModelRef:
    """The model under test a ``model=`` spec names (module docstring)."""
    from .align import aligned_adapter_ref, model_ref
    from .attack import attack_stage
    from .expo import expo_stage, reference_stage
    from .fusion import fusion_stage
    from .restore import defence_stage

    head, *rest = spec.split(":")
    try:
        if not rest:
            return model_ref(params, run, head)
        if head == "aligned" and len(rest) == 1:
            return aligned_adapter_ref(params, run, rest[0])
        if head == "attack" and len(rest) in (3, 4):
            return attack_stage(params, run, rest[0], rest[1], float(rest[2]), *(int(x) for x in rest[3:]))
        if head == "expo" and len(rest) == 2:
            return expo_stage(params, run, rest[0], float(rest[1]))
        if head == "reference" and len(rest) == 1:
            return reference_stage(params, run, rest[0])
        if head == "restore" and len(rest) == 4:
            attacked = attack_stage(params, run, rest[1], rest[2], float(rest[3]))
            return defence_stage(params, run, attacked, rest[1], rest[0])
        if head == "fusion" and len(rest) == 2:
            return fusion_stage(params, run, tuple(rest[1].split("+")), rest[0])
    except ValueError as err:
        raise UsageError(f"model={spec}: {err}") from None
    raise UsageError(f"model={spec}: not a model; forms: {', '.join(MODEL_FORMS)}")


def _model(params, run, args) -> ModelRef:
    if "model" not in args:
        raise UsageError(f"this stage needs model=…; forms: {', '.join(MODEL_FORMS)}")
    return model_from_spec(params, run, str(args.pop("model")))


def _reference(params, run, args) -> ModelRef:
    """The model a calibration or mask stage reads: ``model=…`` (any), or ``reference=<method>`` (its EXPO
    reference; ``plain=true`` for the aligned adapter itself)."""
    from .regions import reference_for

    if "model" in args:
        return _model(params, run, args)
    if "reference" not in args:
        raise UsageError("this stage needs reference=<method> (its safety reference) or model=… (any model)")
    return reference_for(params, run, str(args.pop("reference")), "plain" if args.pop("plain", False) else "expo")


def _tasks(args) -> tuple[str, ...]:
    if "tasks" not in args:
        raise UsageError("this stage needs tasks=<task>[+<task>…]")
    return tuple(str(args.pop("tasks")).split("+"))


def _generations(params, run, args):
    from .evaluate import generations_stage

    return generations_stage(params, run, _model(params, run, args), args.pop("slice", "test"))


def _judge(params, run, args):
    from .evaluate import judge_stage

    generations = _generations(params, run, args)
    return judge_stage(params, run, generations, args.pop("judge", params.judges.primary))


def _restore(params, run, args):
    from .attack import attack_stage
    from .restore import defence_stage

    try:
        method, task, p = args.pop("method"), args.pop("task"), float(args.pop("p"))
        defence = args.pop("defence")
    except KeyError as err:
        raise UsageError(f"stage restore needs defence=, method=, task= and p= (missing {err})") from None
    attacked = attack_stage(params, run, method, task, p)
    return defence_stage(params, run, attacked, method, defence, **{k: args.pop(k) for k in list(args)
                                                                     if k in ("reference", "scorer",
                                                                              "mask_sparsity")})


def _call(function_name: str) -> Callable:
    """A stage whose arguments are plain values: call it with them as keywords (a missing or unknown one is a
    usage error naming the stage's arguments)."""
    def call(params, run, args):
        kind = STAGES[function_name]
        signature = inspect.signature(kind.function)
        accepted = list(signature.parameters)[2:]  # after (params, run)
        unknown = sorted(set(args) - set(accepted))
        if unknown:
            raise UsageError(f"stage {function_name} takes no {', '.join(unknown)} (arguments: "
                             f"{', '.join(accepted) or 'none'})")
        missing = [p for p in accepted if signature.parameters[p].default is inspect.Parameter.empty and p not in args]
        if missing:
            raise UsageError(f"stage {function_name} needs {missing[0]}=… (arguments: {', '.join(accepted)})")
        kwargs = dict(args)
        args.clear()
        return kind.function(params, run, **kwargs)

    return call


COMMANDS: dict[str, Callable[[Params, Run, dict], Any]] = {
    "world": _call("world"), "tokenizer": _call("tokenizer"), "base_model": _call("base_model"),
    "moderation": _call("moderation"), "align": _call("align"), "mixture": _call("mixture"),
    "attack": _call("attack"), "expo": _call("expo"), "reference": _call("reference"),
    "generations": _generations, "judge": _judge,
    "accuracy": lambda params, run, args: STAGES["accuracy"].function(params, run, _model(params, run, args),
                                                                       args.pop("task")),
    "calibration": lambda params, run, args: STAGES["calibration"].function(params, run,
                                                                             _reference(params, run, args)),
    "mask": lambda params, run, args: STAGES["mask"].function(params, run, _reference(params, run, args),
                                                               args.pop("scorer", "low_rank"),
                                                               args.pop("mask_sparsity", None)),
    "restore": _restore,
    "fusion": lambda params, run, args: STAGES["fusion"].function(params, run, _tasks(args), args.pop("name")),
    "learned_mask": lambda params, run, args: STAGES["learned_mask"].function(params, run, _tasks(args)),
    "learned_mask_random": lambda params, run, args: STAGES["learned_mask_random"].function(params, run,
                                                                                             _tasks(args)),
}


def run_stage(params: Params, run: Run, name: str, args: dict[str, Any]):
    """Request the stage ``name`` with ``args`` (building it unless cached); returns its artifact or model."""
    STAGES[name]  # an unknown name: one error listing the stages
    args = dict(args)
    try:
        result = COMMANDS[name](params, run, args)
    except NlsrError:
        raise
    except KeyError as err:
        raise UsageError(f"stage {name} needs {err.args[0]}=… (arguments: {', '.join(STAGES[name].args)})") from None
    except TypeError as err:
        raise UsageError(f"stage {name}: {err} (arguments: {', '.join(STAGES[name].args)})") from None
    if args:
        raise UsageError(f"stage {name} takes no {', '.join(sorted(args))} (arguments: "
                         f"{', '.join(STAGES[name].args) or 'none'})")
    return result
