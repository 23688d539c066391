"""Evaluation: batched greedy generation, safety judges behind one interface, harmful score."""

from .generation import generate_responses
from .judges import JUDGES, Judge, Verdict, build_judge, harmful_score

__all__ = ["generate_responses", "JUDGES", "Judge", "Verdict", "build_judge", "harmful_score"]
