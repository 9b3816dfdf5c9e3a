"""BucketLadder invariants for every preset and for random parameters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketing.ladder import MODEL_SPECS, BucketLadder, fit_loss


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
    # Small images keep a bucket: the floor is a quarter of the top side.
    assert ladder.levels[0] == (side // 4) ** 2
    assert ladder.model == name


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
    sides = (256, 288, 336, 384, 448, 512, 592, 672, 784, 896, 1024)
    assert BucketLadder().levels.tolist() == [s * s for s in sides]
    assert BucketLadder().model is None
    assert BucketLadder.for_model("sd15").levels.tolist() == [s * s for s in range(128, 513, 64)]
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
    assert ladder.max_area == 1024 * 1024 and ladder.model is None
    wider = BucketLadder.from_buckets([(512, 512)], max_area=1024 * 1024, model="flux")
    assert wider.max_area == 1024 * 1024 and wider.model == "flux"
    with pytest.raises(ValueError, match="max_area"):
        BucketLadder.from_buckets([(512, 512)], max_area=256 * 256)
    with pytest.raises(ValueError, match="duplicate"):
        BucketLadder.from_buckets([(512, 512), (512, 512)])
    with pytest.raises(ValueError, match="multiple of 8"):
        BucketLadder.from_buckets([(510, 512)])
    with pytest.raises(ValueError, match="non-empty"):
        BucketLadder.from_buckets([])


def total_loss(ladder: BucketLadder, sizes: np.ndarray) -> float:
    """Sum over images of the best fitting bucket's loss (2 where none fits)."""
    b = ladder.buckets.astype(float)
    w, h = sizes[:, :1].astype(float), sizes[:, 1:].astype(float)
    cap = np.minimum(w * h, ladder.max_area)
    loss = np.where((b[:, 0] <= w) & (b[:, 1] <= h), fit_loss(b[:, 0], b[:, 1], w, h, cap), 2.0)
    return float(np.minimum(loss.min(axis=1), 2.0).sum())


sizes_strategy = st.lists(st.tuples(st.integers(256, 5000), st.integers(256, 5000)),
                          min_size=1, max_size=80).map(lambda v: np.array(v, dtype=np.int64))


@settings(deadline=None, max_examples=30)
@given(sizes=sizes_strategy, budget=st.integers(1, 40), base=st.sampled_from(["flux", "sdxl"]))
def test_from_data_budget_determinism_and_geometry(sizes: np.ndarray, budget: int,
                                                   base: str) -> None:
    preset = BucketLadder.for_model(base)
    ladder = BucketLadder.from_data(sizes, max_buckets=budget, base=base)
    assert 1 <= len(ladder) <= budget
    assert ladder.model == base and ladder.max_area == preset.max_area
    assert ladder.multiple == preset.multiple
    assert {tuple(b) for b in ladder.buckets.tolist()} <= {tuple(b) for b in
                                                           preset.buckets.tolist()}
    again = BucketLadder.from_data(sizes[::-1].copy(), max_buckets=budget, base=preset)
    assert again.buckets.tolist() == ladder.buckets.tolist(), "depends on the row order"
    # A bucket that fits every image exists (a small square), so no image loses its bucket.
    b = ladder.buckets[None]
    fits = (b[..., 0] <= sizes[:, :1]) & (b[..., 1] <= sizes[:, 1:])
    assert fits.any(axis=1).all()
    # Never more buckets than distinct sizes; with a budget that large, as good as the preset.
    assert len(ladder) <= len(np.unique(sizes, axis=0))
    if budget >= len(np.unique(sizes, axis=0)):
        assert total_loss(ladder, sizes) <= total_loss(preset, sizes) + 1e-9


def test_from_data_beats_the_preset_cut_to_the_same_budget() -> None:
    rng = np.random.default_rng(0)
    aspect = rng.choice([4 / 3, 3 / 2, 3 / 4, 2 / 3, 1.0], size=300)
    mp = rng.uniform(0.2, 6.0, size=300) * 1e6
    w = np.sqrt(mp * aspect).astype(np.int64)
    sizes = np.stack([w, (w / aspect).astype(np.int64)], axis=1)
    preset = BucketLadder.for_model("flux")
    small = BucketLadder.from_data(sizes, max_buckets=12)
    assert len(small) <= 12 and not (np.isin(sizes, 0)).any()
    # The 12 most used preset buckets, for contrast: from_data loses less.
    from_counts = np.argsort(-np.bincount(
        np.argmin(np.where((preset.buckets[:, 0] <= sizes[:, :1]) &
                           (preset.buckets[:, 1] <= sizes[:, 1:]),
                           fit_loss(preset.buckets[:, 0].astype(float),
                                    preset.buckets[:, 1].astype(float),
                                    sizes[:, :1].astype(float), sizes[:, 1:].astype(float),
                                    np.minimum(sizes[:, :1] * sizes[:, 1:], preset.max_area)),
                           np.inf), axis=1), minlength=len(preset)), kind="stable")[:12]
    top12 = BucketLadder.from_buckets(preset.buckets[from_counts], 16, max_area=preset.max_area)
    assert total_loss(small, sizes) < total_loss(top12, sizes)
    assert total_loss(small, sizes) < 2.0 * len(sizes) * 0.15  # under 15% loss per image


def test_from_data_errors() -> None:
    with pytest.raises(ValueError, match="max_buckets"):
        BucketLadder.from_data([(1000, 1000)], max_buckets=0)
    with pytest.raises(ValueError, match="at least one image"):
        BucketLadder.from_data([(10, 10)], max_buckets=4)
    with pytest.raises(ValueError, match="unknown model"):
        BucketLadder.from_data([(1000, 1000)], max_buckets=4, base="dalle")


def test_from_data_keeps_every_image_while_one_bucket_can() -> None:
    # Six shapes: one bucket each in the preset; 592x592 is the largest bucket fitting all.
    sizes = [(1024, 1024), (1200, 800), (800, 1200), (1500, 600), (600, 1500), (700, 700)]
    assert BucketLadder.from_data(sizes, max_buckets=1).buckets.tolist() == [[592, 592]]
    two = BucketLadder.from_data(sizes, max_buckets=2).buckets.tolist()
    assert len(two) == 2 and [592, 592] in two
    assert len(BucketLadder.from_data(sizes, max_buckets=6)) == 6
