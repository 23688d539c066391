"""Evaluation: batched greedy generation, safety judges behind one interface, harmful score."""

from .generation import generate_responses
from .judges import JUDGES, Judge, Verdict, build_judge, harmful_score



def release_models() -> None:
    """Free the models this process keeps for evaluations (the engine's bases, the moderation judge), before a
    stage that needs the memory (a training on the same GPU)."""
    from .engine import release
    from .judges import clear_moderation_cache

    release()
    clear_moderation_cache()


__all__ = ["generate_responses", "release_models", "JUDGES", "Judge", "Verdict", "build_judge", "harmful_score"]
