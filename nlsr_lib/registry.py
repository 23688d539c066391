"""One registry type for every family of named things (DESIGN.md §7): stages, alignment methods, judges, region
scorers, merge methods, restoration strategies, defences, ... A :class:`Registry` is a read-only mapping
name → entry, in registration order, with one lookup error for every family::

    MERGE_METHODS = Registry(names.MERGE_METHODS, make=MergeMethod.of)  # entry = make(name, fn, **meta)

    @MERGE_METHODS.register("ties", trims=True)  # as a decorator: the function is returned unchanged
    def ties(taus, lam=1.0, density=0.2): ...

    JUDGES.register("keyword", KeywordJudge)  # as a plain call (no make: the value itself is the entry)

    "ties" in MERGE_METHODS; MERGE_METHODS["ties"]; list(MERGE_METHODS); MERGE_METHODS.names()
    MERGE_METHODS["tie"]  # UnknownName: unknown merge method 'tie'; registered: weight_averaging, ..., consensus_ties

A family that params may choose from is created from its :class:`Names` (:mod:`nlsr_lib.names`, importable without
torch, which config.py validates against); such a registry refuses any name not declared there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from .errors import NlsrError

T = TypeVar("T")
_NOTHING = object()


def unknown_message(kind: str, name: object, names: Iterable[str]) -> str:
    """The one wording of an unknown name, for every family (and for params keys, after ``key: ``)."""
    return f"unknown {kind} {name!r}; registered: {', '.join(names)}"


class UnknownName(NlsrError, KeyError, ValueError):
    """A name no entry of a registry has; a ``KeyError`` (mapping protocol) and a ``ValueError`` (a bad value)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Names:
    """The declared names of a family, in registration order, for modules that must not import its entries."""

    def __init__(self, kind: str, *names: str):
        self.kind, self._names = kind, names

    def names(self) -> tuple[str, ...]:
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __repr__(self) -> str:
        return f"Names({self.kind!r}, {', '.join(map(repr, self._names))})"


class Registry(Mapping[str, T], Generic[T]):
    """Name → entry of one family (module docstring); ``kind`` names the family in errors."""

    def __init__(self, kind: str | Names, make: Callable[..., T] | None = None):
        self.declared = kind if isinstance(kind, Names) else None
        self.kind = kind.kind if isinstance(kind, Names) else kind
        self._make, self._entries = make, {}

    def register(self, name: str, value: Any = _NOTHING, **meta: Any) -> Any:
        """Add ``name``: ``register(name, value, **meta)`` or ``@register(name, **meta)`` above a function."""
        def add(fn: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if self.declared is not None and name not in self.declared:
                raise ValueError(f"{self.kind} {name!r} is not declared in nlsr_lib/names.py (declared: "
                                 f"{', '.join(self.declared.names())}); add it there so params can choose it")
            if meta and self._make is None:
                raise TypeError(f"the {self.kind} registry stores values as they are; it takes no {sorted(meta)}")
            self._entries[name] = self._make(name, fn, **meta) if self._make else fn
            return fn

        return add if value is _NOTHING else add(value)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its entry (tests that register a throwaway entry clean up with it)."""
        entry = self[name]
        del self._entries[name]
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(unknown_message(self.kind, name, self._entries)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


__all__ = ["Names", "Registry", "UnknownName", "unknown_message"]
