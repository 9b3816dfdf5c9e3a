"""BucketLadder invariants for every preset and for random parameters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketing.ladder import MODEL_SPECS, BucketLadder


def check_invariants(ladder: BucketLadder) -> None:
    b = ladder.buckets
    assert b.dtype == np.int64 and b.ndim == 2 and b.shape[1] == 2 and len(b) > 0
    assert (b % ladder.multiple == 0).all() and (b > 0).all()
    assert len(np.unique(b, axis=0)) == len(b), "duplicate buckets"
    assert {tuple(x) for x in b.tolist()} == {(h, w) for w, h in b.tolist()}, "not symmetric"
    aspect = b[:, 0] / b[:, 1]
    assert (aspect <= ladder.max_aspect + 1e-12).all()
    assert (1 / aspect <= ladder.max_aspect + 1e-12).all()
    assert (b[:, 0] * b[:, 1] <= ladder.levels[ladder.bucket_level]).all()
    assert (ladder.levels <= ladder.max_area).all()
    # Sorted by level, then aspect; each level an antichain (widths up, heights down).
    assert (np.diff(ladder.bucket_level) >= 0).all()
    for j in range(len(ladder.levels)):
        sl = ladder.level_slice(j)
        assert (np.diff(b[sl, 0]) > 0).all() and (np.diff(b[sl, 1]) < 0).all()


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_presets(name: str) -> None:
    ladder = BucketLadder.for_model(name)
    spec = MODEL_SPECS[name]
    check_invariants(ladder)
    assert ladder.multiple == spec.multiple and ladder.max_area == spec.max_area
    assert ladder.levels.tolist() == sorted(spec.levels)
    side = int(np.sqrt(spec.max_area))
    assert [side, side] in ladder.buckets.tolist()


def test_flux_constraints_match_model() -> None:
    assert MODEL_SPECS["flux"].multiple == 16 and MODEL_SPECS["flux"].t5_max_length == 512
    assert MODEL_SPECS["flux-schnell"].t5_max_length == 256
    assert MODEL_SPECS["sdxl"].multiple == 64
    assert BucketLadder.for_model("flux", max_area=768 * 768).levels.max() == 768 * 768


@settings(deadline=None, max_examples=25)
@given(
    side=st.integers(8, 96),
    multiple=st.sampled_from([8, 16, 32, 64]),
    step_k=st.integers(1, 4),
    max_aspect=st.floats(1.0, 6.0),
    n_levels=st.integers(1, 4),
)
def test_random_ladders(side: int, multiple: int, step_k: int, max_aspect: float,
                        n_levels: int) -> None:
    max_area = (side * 16) ** 2
    levels = sorted({max(multiple**2, max_area * (k + 1) // n_levels) for k in range(n_levels)})
    ladder = BucketLadder(max_area=max_area, multiple=multiple, step=multiple * step_k,
                          max_aspect=max_aspect, levels=levels)
    check_invariants(ladder)


def test_default_levels_and_errors() -> None:
    assert BucketLadder().levels.tolist() == [s * s for s in (512, 640, 768, 896, 1024)]
    with pytest.raises(ValueError, match="unknown model"):
        BucketLadder.for_model("dalle")
    with pytest.raises(ValueError, match="levels"):
        BucketLadder(levels=[2048 * 2048])
    with pytest.raises(ValueError, match="step"):
        BucketLadder(multiple=16, step=40)


def test_from_buckets() -> None:
    ladder = BucketLadder.from_buckets([(1024, 1024), (1152, 896), (896, 1152), (512, 512)])
    assert ladder.buckets.tolist() == [[512, 512], [896, 1152], [1024, 1024], [1152, 896]]
    assert ladder.levels.tolist() == [512 * 512, 1024 * 1024]
    assert ladder.bucket_level.tolist() == [0, 1, 1, 1]
    assert ladder.max_area == 1024 * 1024
    with pytest.raises(ValueError, match="duplicate"):
        BucketLadder.from_buckets([(512, 512), (512, 512)])
    with pytest.raises(ValueError, match="multiple of 8"):
        BucketLadder.from_buckets([(510, 512)])
    with pytest.raises(ValueError, match="non-empty"):
        BucketLadder.from_buckets([])
