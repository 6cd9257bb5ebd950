"""Near-duplicate groups: images whose perceptual hashes differ in at most d of 64 bits.

Memorization concentrates on duplicated images (Carlini et al. 2023; Webster's LAION-2B
de-duplication found large near-duplicate clusters), so the cascade records each image's group
and its size, and confirms the largest groups first.

A group is a connected component of the graph "Hamming distance <= d" over the run's images
(single linkage: a chain of close copies is one group). The components are exact at every scale:
identical hashes collapse first, then multi-index hashing (Norouzi et al.) finds every close
pair: split the 64 bits into d + 1 bands; two hashes within distance d agree exactly on at least
one band (pigeonhole), so only hashes sharing a band value are compared. What is approximate is
pHash itself as a test of "near-duplicate": crops, flips and heavy edits move many bits.
Cost grows with d (fewer bits per band, larger buckets): d <= 8 is the useful range.
"""

from __future__ import annotations

import numpy as np

HASH_BITS = 64


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)


def _close_within(hashes: np.ndarray, members: np.ndarray, distance: int, block: int = 2048):
    """Pairs (i < j) of `members` within `distance`, compared in blocks so a huge bucket stays in memory."""
    for s in range(0, len(members), block):
        a = members[s : s + block]
        for t in range(s, len(members), block):
            b = members[t : t + block]
            close = np.bitwise_count(hashes[a][:, None] ^ hashes[b][None, :]) <= distance
            if s == t:
                close &= np.triu(np.ones_like(close), k=1)
            i, j = np.nonzero(close)
            if len(i):
                yield np.stack([np.minimum(a[i], b[j]), np.maximum(a[i], b[j])], 1)


def close_pairs(hashes: np.ndarray, distance: int) -> np.ndarray:
    """Every pair (i, j), i < j, of distinct uint64 hashes within `distance` bits: (P, 2) indices."""
    found = []
    for bits in np.array_split(np.arange(HASH_BITS), distance + 1):
        band = (hashes >> np.uint64(bits[0])) & np.uint64((1 << len(bits)) - 1)
        order = np.argsort(band, kind="stable")
        starts = np.flatnonzero(np.r_[True, band[order][1:] != band[order][:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(order)]):
            if end - start > 1:
                found.extend(_close_within(hashes, order[start:end], distance))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


def near_duplicate_groups(
    phashes: list[str | None], keys: list[str], distance: int
) -> tuple[list[str | None], list[int]]:
    """Each image's group (the smallest key in it) and the group's size; None and 1 without a hash.

    `phashes` are 16-hex-digit perceptual hashes (data.images.perceptual_hash), `keys` sortable
    names of the images (their ids): the group's name is its smallest key, so it does not depend
    on the order images arrive in.
    """
    if not 0 <= distance < HASH_BITS // 2:
        raise ValueError(f"distance must be in [0, {HASH_BITS // 2}), got {distance}")
    hashed = [i for i, h in enumerate(phashes) if h]
    values = np.array([int(phashes[i], 16) for i in hashed], dtype=np.uint64)
    unique, inverse = np.unique(values, return_inverse=True)
    parent = np.arange(len(unique))
    for a, b in close_pairs(unique, distance):
        _union(parent, int(a), int(b))
    roots = np.array([_find(parent, i) for i in range(len(unique))], dtype=np.int64)[inverse]
    group_name: dict[int, str] = {}
    size: dict[int, int] = {}
    for i, root in zip(hashed, roots.tolist()):
        name = group_name.get(root)
        group_name[root] = keys[i] if name is None or keys[i] < name else name
        size[root] = size.get(root, 0) + 1
    groups: list[str | None] = [None] * len(phashes)
    counts = [1] * len(phashes)
    for i, root in zip(hashed, roots.tolist()):
        groups[i], counts[i] = group_name[root], size[root]
    return groups, counts
