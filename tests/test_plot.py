"""results.png from a hand-made curve: bytes, labels, notes and G's panel (no cluster, no model)."""
import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from pruning.report import curve_figure, plot_curve


def make_curve(channels: int = 10) -> pd.DataFrame:
    """One row per k = 0..channels: accuracy falls slowly, the ASR drops at half the channels."""
    k = np.arange(channels + 1)
    fraction = k / channels
    accuracy = 97 - 30 * fraction ** 3
    asr = np.where(fraction < 0.5, 99.0, 0.5)
    return pd.DataFrame({
        "channels_pruned": k, "fraction_pruned": fraction,
        "valid_accuracy": accuracy, "valid_asr": asr,
        "test_accuracy": accuracy - 0.5, "test_asr": asr,
        "channel": np.r_[-1, np.arange(channels)],
        "goodnet_test_accuracy": accuracy - 2, "goodnet_test_asr": asr - 0.5,
        "goodnet_detection_rate": 100 - asr, "goodnet_false_alarm_rate": 2 + 10 * fraction,
    })


def texts(figure) -> list[str]:
    """Every string drawn on the figure: titles, tick labels, labels, legend entries."""
    return [text.get_text() for text in figure.findobj(Text)]


def test_png_is_byte_identical_when_written_twice(tmp_path):
    selected = {2.0: 5, 4.0: 5, 10.0: None}
    plot_curve(make_curve(), selected, tmp_path / "a.png")
    plot_curve(make_curve(), selected, tmp_path / "b.png")
    data = (tmp_path / "a.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert data == (tmp_path / "b.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary left


def test_thresholds_with_equal_k_share_one_label_and_unreached_ones_are_named():
    strings = texts(curve_figure(make_curve(), {2.0: 5, 4.0: 5, 10.0: None}))
    assert [s for s in strings if "k=" in s] == ["X=2, 4 (k=5)"]
    assert [s for s in strings if "not reached" in s] == ["X=10: not reached"]


def test_every_threshold_reached_has_no_note_and_none_reached_has_no_label():
    assert not [s for s in texts(curve_figure(make_curve(), {2.0: 3, 4.0: 6})) if "not reached" in s]
    strings = texts(curve_figure(make_curve(), {2.5: None, 10.0: None}))
    assert [s for s in strings if "not reached" in s] == ["X=2.5, 10: not reached"]
    assert not [s for s in strings if "k=" in s]


def test_labels_of_adjacent_k_do_not_overlap():
    figure = curve_figure(make_curve(100), {1.0: 50, 2.0: 51, 3.0: 52, 4.0: 53})
    renderer = FigureCanvasAgg(figure).get_renderer()
    boxes = [text.get_window_extent(renderer) for text in figure.axes[0].texts]
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_goodnet_lines_are_drawn_below_bprime_on_the_same_x():
    top, bottom = curve_figure(make_curve(), {2.0: 5}).axes
    labels = [line.get_label() for line in bottom.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["G accuracy (test)", "G attack success rate (test)"]
    assert not [line for line in top.get_lines() if line.get_label().startswith("G ")]
    accuracy = bottom.get_lines()[0]
    assert list(accuracy.get_xdata()) == pytest.approx(list(100 * make_curve()["fraction_pruned"]))
    assert bottom.get_shared_x_axes().joined(top, bottom)


def test_plotting_leaves_the_backend_alone(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a library must not choose the process's backend")

    monkeypatch.setattr(matplotlib, "use", refuse)
    plot_curve(make_curve(), {2.0: 5}, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0
