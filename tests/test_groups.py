"""Near-duplicate groups: close pairs against brute force, components, names that do not depend on
order, and real perceptual hashes of re-encoded and resized copies."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from memray.cascade.groups import close_pairs, near_duplicate_groups
from memray.data.images import perceptual_hash
from memray.demo import generated_scene, render_scene


def brute_force_pairs(hashes: np.ndarray, distance: int) -> set[tuple[int, int]]:
    close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= distance
    i, j = np.nonzero(np.triu(close, k=1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("distance", [0, 1, 3, 6])
def test_close_pairs_are_exactly_the_brute_force_pairs(distance):
    rs = np.random.default_rng(distance)
    base = rs.integers(0, 2**63, size=120, dtype=np.uint64)
    # copies of the base hashes with 1..8 random bits flipped: pairs at every distance around the cut
    flips = [
        base[k] ^ np.uint64(sum(1 << int(b) for b in rs.choice(64, rs.integers(1, 9), replace=False)))
        for k in range(120)
    ]
    hashes = np.unique(np.concatenate([base, np.array(flips, dtype=np.uint64)]))
    found = {tuple(p) for p in close_pairs(hashes, distance).tolist()}
    assert found == brute_force_pairs(hashes, distance)
    assert distance == 0 or found  # the test exercises real pairs


def test_a_bucket_larger_than_a_block_is_compared_in_blocks():
    hashes = np.arange(5000, dtype=np.uint64) << np.uint64(40)  # one shared low band: one bucket of 5000
    assert {tuple(p) for p in close_pairs(hashes, 1).tolist()} == brute_force_pairs(hashes, 1)


def test_groups_are_components_named_by_their_smallest_key_whatever_the_order():
    phashes = ["0000000000000000", "0000000000000001", "0000000000000003", "ffffffffffffffff", None, "0000000000000001"]
    keys = ["d", "b", "c", "a", "e", "f"]
    groups, counts = near_duplicate_groups(phashes, keys, distance=1)
    # a chain 0 - 1 - 3 is one group (single linkage); identical hashes join it too
    assert groups == ["b", "b", "b", "a", None, "b"] and counts == [4, 4, 4, 1, 1, 4]
    order = [5, 3, 1, 0, 4, 2]
    shuffled, shuffled_counts = near_duplicate_groups([phashes[i] for i in order], [keys[i] for i in order], 1)
    assert shuffled == [groups[i] for i in order] and shuffled_counts == [counts[i] for i in order]
    with pytest.raises(ValueError):
        near_duplicate_groups(phashes, keys, distance=40)


def _variants(image: Image.Image) -> list[Image.Image]:
    """The copies a scrape holds: re-encoded as JPEG, resized, and both."""
    out = []
    for quality, size in ((90, None), (60, None), (95, 48), (75, 80)):
        copy = image.resize((size, size), Image.Resampling.BICUBIC) if size else image
        buffer = io.BytesIO()
        copy.save(buffer, "JPEG", quality=quality)
        out.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return out


def test_real_phashes_group_copies_of_a_scene_and_keep_different_scenes_apart():
    scenes = [render_scene(generated_scene(7, "normal", i), 64) for i in range(12)]
    phashes, keys, truth = [], [], []
    for k, scene in enumerate(scenes):
        for v, image in enumerate([scene, *_variants(scene)] if k < 4 else [scene]):
            phashes.append(perceptual_hash(image))
            keys.append(f"{k:02d}-{v}")
            truth.append(k)
    assert all(len(h) == 16 for h in phashes)
    groups, counts = near_duplicate_groups(phashes, keys, distance=6)
    for k in range(4):  # every copy of a duplicated scene is in its group
        members = [g for g, t in zip(groups, truth) if t == k]
        assert len(set(members)) == 1 and counts[truth.index(k)] == 5
    singles = [g for g, t in zip(groups, truth) if t >= 4]
    assert len(set(singles)) == len(singles)  # every other scene stands alone
