"""The official LongBench-Write length score and the paper's required-length buckets (lwlib.scoring)."""

from __future__ import annotations

import pytest

from lwlib.scoring import BUCKET_NAMES, bucket_of, length_score


@pytest.mark.parametrize("required,actual,expected", [
    (1000, 500, 50.0),          # 0.5x: 1 - (2 - 1)/2
    (1000, 1500, 83.3333333),   # 1.5x: 1 - 0.5/3
    (1000, 2000, 66.6666667),   # 2x
    (1000, 3000, 33.3333333),   # 3x
    (900, 300, 0.0),            # exactly 1/3x
    (900, 100, 0.0),            # below 1/3x
    (1000, 4000, 0.0),          # exactly 4x
    (1000, 9000, 0.0),          # beyond 4x
    (1000, 1000, 100.0),        # equal
    (1000, 0, 0.0),             # empty response (official script divides by zero)
    (200, 150, 100 * (1 - (200 / 150 - 1) / 2)),
])
def test_length_score_hand_values(required, actual, expected):
    assert length_score(required, actual) == pytest.approx(expected, abs=1e-6)


def test_length_score_rejects_bad_lengths():
    with pytest.raises(ValueError, match="required"):
        length_score(0, 10)
    with pytest.raises(ValueError, match="actual"):
        length_score(100, -1)


def test_buckets_follow_the_paper():
    assert [bucket_of(x) for x in (0, 499, 500, 1999, 2000, 3999, 4000, 20000)] == [
        "[0,500)", "[0,500)", "[500,2k)", "[500,2k)", "[2k,4k)", "[2k,4k)", "[4k,20k]", "[4k,20k]"]
    assert BUCKET_NAMES == ("[0,500)", "[500,2k)", "[2k,4k)", "[4k,20k]")
    with pytest.raises(ValueError, match="negative"):
        bucket_of(-1)
