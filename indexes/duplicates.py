"""Near-duplicate groups in which every member is at least ``threshold`` like its group's leader.

Joining every similar pair (single-link, union-find) chains: A is like B, B like C, ... and at a
threshold of 0.95 the demo got a group of 139 images whose least similar pair scored 0.63. So
groups are stars instead: the image with the most near-duplicates leads a group of those of its
near-duplicates not yet taken, then the next, and so on. Each member's score is its similarity to
the leader, so no score in a group is below the threshold. Exact byte copies (the indexer's
``duplicate`` rows, which have no vector of their own) join the group of their original, first.

The functions here are pure: ``Collection.duplicates`` gathers the vectors and copies under its
own lock and passes a search function over its index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy only in annotations: the CLI reads THRESHOLD before numpy loads
    import numpy as np

THRESHOLD = 0.95
"""The default similarity at which two images count as near-duplicates (CLI, UI, library)."""
NEIGHBOURS = 16
"""Neighbours looked up per image (a group can be larger: others find its leader too)."""

Search = Callable[["np.ndarray", int], list[list[tuple[int, float]]]]
"""(vectors, k) -> for each vector, its k nearest stored (id, score) pairs."""


@dataclass(frozen=True)
class Group:
    """A leader and its members, each with its similarity to the leader (1.0 for copies)."""

    leader: int
    members: list[tuple[int, float]]  # leader first, then exact copies, then by score

    @property
    def ids(self) -> list[int]:
        return [i for i, _ in self.members]

    @property
    def min_score(self) -> float:
        return min(s for _, s in self.members)


def near_pairs(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], search: Search, threshold: float
) -> dict[int, dict[int, float]]:
    """For each stored id, its other ids with cosine >= ``threshold`` (both directions)."""
    near: dict[int, dict[int, float]] = {}
    for ids, vecs in chunks:
        for a, found in zip(ids.tolist(), search(vecs, NEIGHBOURS), strict=True):
            for b, s in found:
                if b != a and b >= 0 and s >= threshold:
                    near.setdefault(a, {})[b] = s
                    near.setdefault(b, {})[a] = s
    return near


def star_groups(
    near: dict[int, dict[int, float]], copies: Sequence[tuple[int, int]]
) -> list[Group]:
    """Groups (largest first, then by leader id) from near pairs and (copy, original) pairs."""
    copies_of: dict[int, list[int]] = {}
    for copy, original in copies:
        copies_of.setdefault(original, []).append(copy)
    order = sorted(
        set(near) | set(copies_of),
        key=lambda i: (-len(near.get(i, ())) - len(copies_of.get(i, ())), i),
    )
    taken: set[int] = set()
    groups = []
    for leader in order:
        if leader in taken:
            continue
        taken.add(leader)
        close = sorted(
            ((b, s) for b, s in near.get(leader, {}).items() if b not in taken),
            key=lambda p: (-p[1], p[0]),
        )
        taken.update(b for b, _ in close)
        members = [(leader, 1.0), *((c, 1.0) for c in sorted(copies_of.get(leader, ())))]
        for b, s in close:  # each near-duplicate followed by its own exact copies
            members += [(b, s), *((c, s) for c in sorted(copies_of.get(b, ())))]
        if len(members) > 1:
            groups.append(Group(leader, members))
    groups.sort(key=lambda g: (-len(g.members), g.leader))
    return groups
