"""Selecting B' per threshold X from the curve: the first k > 0 whose validation accuracy is at
least X points (or X percent of B's accuracy, --relative) below B's."""
from __future__ import annotations

import pandas as pd
import pytest

from pruning.select import accuracy_limit, select_prefixes, threshold_label


def curve(accuracies) -> pd.DataFrame:
    """A results.csv with these validation accuracies at k = 0, 1, ..."""
    return pd.DataFrame({"channels_pruned": range(len(accuracies)), "valid_accuracy": accuracies})


# As the sweep computes them: 100 * correct / rows. 96.7 - 94.7 is 2.0000000000000036 in
# floating point and 96.7 - 2 is 94.7 exactly; a drop of exactly X counts as reached.
ACCURACIES = [100 * 967 / 1000, 100 * 967 / 1000, 100 * 952 / 1000, 100 * 947 / 1000,
              100 * 900 / 1000, 100 * 500 / 1000]


@pytest.mark.parametrize("thresholds, relative, expected", [
    ([2, 4, 10], False, {2: 3, 4: 4, 10: 5}),
    ([1.5], False, {1.5: 2}),                 # 96.7 - 95.2 = 1.5: exactly X below
    ([60], False, {60: None}),                # pruning everything never drops 60 points
    ([0], False, {0: 1}),                     # k = 0 is B itself, never a B'
    ([10, 50], True, {10: 5, 50: None}),      # 87.03 or below at k = 5; 48.35 never
    ([4], True, {4: 4}),                      # 4 % of 96.7 = 3.868 points: 92.832 or below
])
def test_first_k_at_least_x_below(thresholds, relative, expected):
    assert select_prefixes(curve(ACCURACIES), thresholds, relative) == expected


def test_rows_in_any_order_and_k0_required():
    shuffled = curve(ACCURACIES).sample(frac=1, random_state=0)
    assert select_prefixes(shuffled, [2]) == {2: 3}
    with pytest.raises(ValueError, match="k = 0 row"):
        select_prefixes(curve(ACCURACIES).iloc[1:], [2])


def test_limits_and_labels():
    assert accuracy_limit(98.6, 2) == pytest.approx(96.6)
    assert accuracy_limit(98.6, 10, relative=True) == pytest.approx(88.74)
    assert [threshold_label(x) for x in (2, 2.0, 2.5, 0.1)] == ["2", "2", "2.5", "0.1"]
