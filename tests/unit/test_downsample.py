"""Min/max downsampling of metric series (pure)."""

import math
import random

import pytest

from kiln_store.downsample import minmax


def _values(pts):
    return [v for _, v in pts if v is not None]


def test_short_series_are_returned_unchanged():
    pts = [(s, s * 0.5) for s in range(100)]
    assert minmax(pts, 100) == pts
    assert minmax([], 10) == []


def test_a_long_series_fits_and_keeps_order_first_last_and_every_extreme():
    rng = random.Random(7)
    pts = [(s, math.sin(s / 500) + rng.gauss(0, 0.1)) for s in range(100_000)]
    pts[12_345] = (12_345, 50.0)  # a single spike
    pts[77_777] = (77_777, -50.0)  # a single dip
    small = minmax(pts, 2000)
    assert 1900 <= len(small) <= 2000
    steps = [s for s, _ in small]
    assert steps == sorted(set(steps))
    assert small[0] == pts[0] and small[-1] == pts[-1]
    assert (12_345, 50.0) in small and (77_777, -50.0) in small
    assert set(small) <= set(pts)


def test_each_bucket_keeps_its_min_and_max():
    pts = [(s, float(s % 10)) for s in range(10_000)]  # a saw tooth: every bucket spans 0..9
    small = minmax(pts, 202)
    inner = small[1:-1]
    assert len(inner) == 200
    assert sorted({v for _, v in inner}) == [0.0, 9.0]


def test_irregular_steps_are_bucketed_by_step_range():
    pts = [(s, 1.0) for s in range(1000)] + [(1_000_000 + s, float(s)) for s in range(1000)]
    small = minmax(pts, 50)
    assert len(small) <= 50
    assert (1_000_999, 999.0) in small and (1_000_000, 0.0) in small
    assert any(s < 1000 for s, _ in small)


def test_gaps_survive_as_none_points():
    pts = [(s, None if 4000 <= s < 6000 else 1.0) for s in range(10_000)]
    small = minmax(pts, 100)
    gaps = [s for s, v in small if v is None]
    assert gaps and all(4000 <= s < 6000 for s in gaps)
    assert _values(small) and set(_values(small)) == {1.0}


def test_flat_series_keep_one_point_per_bucket():
    small = minmax([(s, 3.0) for s in range(10_000)], 100)
    assert 2 < len(small) <= 100
    assert set(_values(small)) == {3.0}


def test_max_points_must_leave_room_for_a_bucket():
    with pytest.raises(ValueError):
        minmax([(1, 1.0)], 3)
