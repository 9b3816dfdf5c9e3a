"""BucketLadder invariants for every preset and for random parameters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.assign import realistic_sizes
from bucketing.assign import assign
from bucketing.cli import args
from bucketing.fit_ladder import own_sizes
from bucketing.ladder import FIT_MODES, MODEL_SPECS, BucketLadder, _preset_budget, fit_loss


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
    # The generated levels, plus one per antichain layer of canonical sizes they lack.
    assert set(spec.levels) <= set(ladder.levels.tolist())
    extra = len(ladder.levels) - len(spec.levels)
    assert extra == {"flux": 3, "flux-schnell": 3, "sd3": 3, "sdxl": 1, "sd15": 0}[name]
    assert len(ladder) == {"sdxl": 100, "sd15": 39}.get(name, 406)
    side = int(np.sqrt(spec.max_area))
    assert [side, side] in ladder.buckets.tolist()
    # Small images keep a bucket: the floor is a quarter of the top side.
    assert ladder.levels[0] == (side // 4) ** 2
    assert ladder.model == name


CANONICAL = {
    "flux": [(1024, 1024), (832, 1216), (1216, 832), (1344, 768), (768, 1344), (1152, 896),
             (896, 1152), (1536, 640), (640, 1536), (1248, 832), (832, 1248), (1360, 768),
             (768, 1360), (1024, 768), (768, 1024), (768, 768), (512, 512)],
    "sdxl": [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
             (768, 1344), (1536, 640), (640, 1536), (1024, 768), (768, 1024), (768, 768),
             (512, 512)],
    "sd15": [(512, 512), (512, 384), (384, 512), (576, 448), (448, 576), (640, 384),
             (384, 640)],
}
CANONICAL["flux-schnell"] = CANONICAL["sd3"] = CANONICAL["flux"]


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_presets_keep_the_canonical_sizes(name: str) -> None:
    ladder = BucketLadder.for_model(name)
    sizes = np.array(CANONICAL[name], dtype=np.int64)
    assert {tuple(s) for s in sizes.tolist()} <= {tuple(b) for b in ladder.buckets.tolist()}
    a = assign(sizes, ladder)
    assert a.bucket_wh.tolist() == sizes.tolist()  # neither resized ...
    assert (a.crop_loss == 0).all() and (a.resolution_loss == 0).all()  # ... nor cropped
    assert (a.scale == 1.0).all()
    # A few pixels more on either side still trains at the canonical size.
    b = assign(sizes + 7, ladder)
    assert b.bucket_wh.tolist() == sizes.tolist()


def test_the_commands_offer_every_fit_mode() -> None:
    assert args.FIT_MODES == FIT_MODES


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
    """Sum over images of the best fitting bucket's loss; an image no bucket fits costs more
    than every loss together (2 per image, plus one)."""
    lost = 2.0 * len(sizes) + 2.0
    b = ladder.buckets.astype(float)
    w, h = sizes[:, :1].astype(float), sizes[:, 1:].astype(float)
    cap = np.minimum(w * h, ladder.max_area)
    loss = np.where((b[:, 0] <= w) & (b[:, 1] <= h), fit_loss(b[:, 0], b[:, 1], w, h, cap), lost)
    return float(np.minimum(loss.min(axis=1), lost).sum())


sizes_strategy = st.lists(st.tuples(st.integers(100, 5000), st.integers(100, 5000)),
                          min_size=1, max_size=60).map(lambda v: np.array(v, dtype=np.int64))


def on_lattice(ladder: BucketLadder, base: BucketLadder) -> bool:
    """Every bucket on ``base``'s lattice: sides multiples of its multiple, area between its
    smallest bucket's and its max_area, aspect within its max_aspect."""
    b, area = ladder.buckets, ladder.areas
    return bool((b % base.multiple == 0).all() and (area <= base.max_area).all()
                and (area >= base.areas.min()).all()
                and (ladder.aspects <= base.max_aspect + 1e-12).all()
                and (1 / ladder.aspects <= base.max_aspect + 1e-12).all())


def cut_preset(preset: BucketLadder, sizes: np.ndarray, budget: int) -> BucketLadder:
    """The preset's buckets these sizes use, or the preset's own greedy cut to ``budget``."""
    used = np.flatnonzero(assign(sizes, preset).counts > 0)
    if len(used) > budget:
        used = _preset_budget(preset, sizes[:, 0], sizes[:, 1], budget)
    return BucketLadder.from_buckets(preset.buckets[used], preset.multiple,
                                     max_area=preset.max_area)


@settings(deadline=None, max_examples=30)
@given(sizes=sizes_strategy, budget=st.integers(1, 40), base=st.sampled_from(["flux", "sdxl"]))
def test_from_data_properties(sizes: np.ndarray, budget: int, base: str) -> None:
    preset = BucketLadder.for_model(base)
    fits_any = assign(sizes, preset).accepted
    if not fits_any.any():
        with pytest.raises(ValueError, match="at least one image"):
            BucketLadder.from_data(sizes, max_buckets=budget, base=base)
        return
    ladder = BucketLadder.from_data(sizes, max_buckets=budget, base=base)
    assert 1 <= len(ladder) <= budget
    assert ladder.model == base and ladder.max_area == preset.max_area
    assert ladder.multiple == preset.multiple and on_lattice(ladder, preset)
    assert ladder.max_aspect == preset.max_aspect  # extreme means what it meant
    again = BucketLadder.from_data(sizes[::-1].copy(), max_buckets=budget, base=preset)
    assert again.buckets.tolist() == ladder.buckets.tolist(), "depends on the row order"
    a = assign(sizes, ladder)
    assert not a.upscaled.any() and (a.scale[a.accepted] <= 1.0).all()  # never upscales
    # Never worse than the preset cut to the same budget, in what assign minimises.
    assert total_loss(ladder, sizes) <= total_loss(cut_preset(preset, sizes, budget),
                                                   sizes) + 1e-9
    # An image the lattice fits keeps a bucket while the budget allows: one own size each,
    # or one preset bucket that fits them all.
    own = own_sizes(sizes[:, 0], sizes[:, 1], multiple=preset.multiple,
                    max_area=preset.max_area, max_aspect=preset.max_aspect,
                    min_area=int(preset.areas.min()))
    n_own = len(np.unique(own[own[:, 0] > 0], axis=0))
    b = preset.buckets[None]
    one_fits_all = ((b[..., 0] <= sizes[fits_any, :1])
                    & (b[..., 1] <= sizes[fits_any, 1:])).all(axis=0).any()
    if budget >= n_own or one_fits_all:
        assert (a.accepted == fits_any).all()
    assert (a.accepted <= fits_any).all()  # and nothing the lattice cannot fit


@settings(deadline=None, max_examples=30)
@given(sizes=sizes_strategy, base=st.sampled_from(["flux", "sdxl", "sd15"]))
def test_native_gives_every_image_its_own_size(sizes: np.ndarray, base: str) -> None:
    preset = BucketLadder.for_model(base)
    own = own_sizes(sizes[:, 0], sizes[:, 1], multiple=preset.multiple,
                    max_area=preset.max_area, max_aspect=preset.max_aspect,
                    min_area=int(preset.areas.min()))
    has = own[:, 0] > 0
    assert (own[has] <= sizes[has]).all() and (own % preset.multiple == 0).all()
    assert (own[:, 0] * own[:, 1] <= preset.max_area).all()
    # Below max_area (and max_aspect) the own size is the size rounded down to the multiple.
    floor = sizes // preset.multiple * preset.multiple
    small = has & (sizes[:, 0] * sizes[:, 1] <= preset.max_area) & (
        np.maximum(floor[:, 0] / np.maximum(floor[:, 1], 1),
                   floor[:, 1] / np.maximum(floor[:, 0], 1)) <= preset.max_aspect)
    assert (own[small] == floor[small]).all()
    if not has.any():
        return
    ladder = BucketLadder.from_data(sizes, base=base, native=True)
    assert on_lattice(ladder, preset)
    assert {tuple(o) for o in own[has].tolist()} == {tuple(b) for b in ladder.buckets.tolist()}
    a = assign(sizes, ladder)
    assert (a.accepted == has).all() and not a.upscaled.any()
    # Each image trains at its own size or one that loses less.
    cap = np.minimum(sizes[has].prod(axis=1), preset.max_area).astype(float)
    own_loss = fit_loss(own[has, 0].astype(float), own[has, 1].astype(float),
                        sizes[has, 0].astype(float), sizes[has, 1].astype(float), cap)
    got = a.crop_loss[has] + a.resolution_loss[has]
    assert (got <= own_loss + 1e-9).all()


def test_own_size_of_a_large_image_keeps_its_aspect() -> None:
    own = own_sizes(np.array([4032, 3024, 6000, 1000]), np.array([3024, 4032, 1000, 1000]),
                    multiple=16, max_area=1024 * 1024, max_aspect=4.0, min_area=256 * 256)
    assert own.tolist() == [[1184, 880], [880, 1184], [2048, 512], [992, 992]]


def test_from_data_budget_defaults_to_the_preset_buckets_used() -> None:
    sizes = realistic_sizes(3000, seed=5)
    preset = BucketLadder.for_model("flux")
    used = int((assign(sizes, preset).counts > 0).sum())
    assert len(BucketLadder.from_data(sizes)) == used
    assert len(BucketLadder.from_data(sizes, max_buckets=used)) == used


def test_from_data_beats_the_preset_cut_to_the_same_budget() -> None:
    rng = np.random.default_rng(0)
    aspect = rng.choice([4 / 3, 3 / 2, 3 / 4, 2 / 3, 1.0], size=300)
    mp = rng.uniform(0.2, 6.0, size=300) * 1e6
    w = np.sqrt(mp * aspect).astype(np.int64)
    sizes = np.stack([w, (w / aspect).astype(np.int64)], axis=1)
    preset = BucketLadder.for_model("flux")
    small = BucketLadder.from_data(sizes, max_buckets=12)
    assert len(small) <= 12
    assert total_loss(small, sizes) < total_loss(cut_preset(preset, sizes, 12), sizes)
    assert total_loss(small, sizes) < len(sizes) * 0.15  # under 15% loss per image


def test_fitted_ladder_on_realistic_sizes() -> None:
    sizes = realistic_sizes(20000, seed=0)
    preset = BucketLadder.for_model("flux")
    used = int((assign(sizes, preset).counts > 0).sum())
    ladder = BucketLadder.from_data(sizes)
    assert len(ladder) == used
    a = assign(sizes, ladder)
    ok = a.accepted
    res = a.resolution_loss[ok]
    assert res.mean() <= 0.04 and np.percentile(res, 95) <= 0.12
    assert a.crop_loss[ok].mean() <= 0.017
    assert (~ok).mean() <= 0.015 and not a.upscaled.any()


def test_from_data_errors() -> None:
    with pytest.raises(ValueError, match="max_buckets"):
        BucketLadder.from_data([(1000, 1000)], max_buckets=0)
    with pytest.raises(ValueError, match="at least one image"):
        BucketLadder.from_data([(10, 10)], max_buckets=4)
    with pytest.raises(ValueError, match="unknown model"):
        BucketLadder.from_data([(1000, 1000)], max_buckets=4, base="dalle")
    with pytest.raises(ValueError, match="native"):
        BucketLadder.from_data([(1000, 1000)], max_buckets=4, native=True)
    with pytest.raises(ValueError, match="at least one image"):
        BucketLadder.from_data([(10, 10)], native=True)


def test_from_data_keeps_every_image_while_one_bucket_can() -> None:
    # Six shapes: one bucket each; 592x592 is the largest bucket fitting all.
    sizes = [(1024, 1024), (1200, 800), (800, 1200), (1500, 600), (600, 1500), (700, 700)]
    assert BucketLadder.from_data(sizes, max_buckets=1).buckets.tolist() == [[592, 592]]
    two = BucketLadder.from_data(sizes, max_buckets=2).buckets.tolist()
    assert len(two) == 2 and [592, 592] in two
    assert len(BucketLadder.from_data(sizes, max_buckets=6)) == 6
