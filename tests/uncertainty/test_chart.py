"""The uncertainty figures as data (regfw.uncertainty.chart), their SVG and their matplotlib drawing."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch

from regfw.uncertainty import plots
from regfw.uncertainty.chart import Chart, Hist, Line, Panel, nice_ticks
from regfw.uncertainty.chart_mpl import to_figure
from regfw.uncertainty.metrics import ReliabilityData

SVG = "{http://www.w3.org/2000/svg}"


def _tree(chart: Chart) -> ET.Element:
    return ET.fromstring(chart.to_svg())


def _texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_nice_ticks_use_round_steps_inside_the_range():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.73, 1.16) == [0.8, 0.9, 1.0, 1.1]
    assert nice_ticks(0.0, 240.0) == [0.0, 50.0, 100.0, 150.0, 200.0]
    assert nice_ticks(3.0, 3.0) == [3.0]


def test_reliability_bars_only_in_filled_bins_with_their_counts():
    count = torch.tensor([0, 5, 0, 7, 2.0])
    data = ReliabilityData.from_bins(count, torch.tensor([0, 1.5, 0, 4.2, 1.8]), torch.tensor([0, 1, 0, 5, 2.0]))
    root = _tree(plots.reliability_figure(data))
    rects = [r for r in root.iter(f"{SVG}rect") if r.get("stroke-width") == "0.8"]
    blue = [r for r in rects if r.get("fill") == "#4c72b0"]
    hatched = [r for r in rects if r.get("fill", "").startswith("url(#hatch")]
    gray = [r for r in rects if r.get("fill") == "gray"]
    assert len(blue) == len(hatched) == len(gray) == 3  # the three bins that hold inputs
    texts = _texts(root)
    assert {"5", "7", "2"} <= set(texts) and any(t.startswith("Reliability diagram (ECE ") for t in texts)
    assert root.find(f"{SVG}defs/{SVG}pattern") is not None  # the hatch is defined once


def test_non_finite_points_break_a_line_and_labels_are_escaped():
    chart = Chart([Panel([Line([0, 1, 2, 3], [0, float("nan"), 1, 2], markers=True, label="a < b & c")],
                         legend="best")])
    root = _tree(chart)
    assert len(list(root.iter(f"{SVG}polyline"))) == 2
    assert len(list(root.iter(f"{SVG}circle"))) == 3  # a marker at each finite point
    assert "a < b & c" in _texts(root)


def test_best_legend_goes_to_the_emptiest_corner():
    rising = Panel([Line([0, 0.25, 0.5, 0.75, 1], [0, 0.25, 0.5, 0.75, 1], label="rising")], legend="best")
    root = _tree(Chart([rising]))
    box = next(r for r in root.iter(f"{SVG}rect") if r.get("stroke") == "#cccccc")
    frame = [r for r in root.iter(f"{SVG}rect") if r.get("fill") == "none" and r.get("stroke") == "black"][0]
    assert float(box.get("x")) < float(frame.get("x")) + float(frame.get("width")) / 2  # upper left: empty
    assert float(box.get("y")) < float(frame.get("y")) + float(frame.get("height")) / 2


def test_density_histograms_have_unit_area():
    scores = torch.linspace(0, 1, 101)
    correct = scores > 0.3
    chart = plots.score_histogram_figure(scores, correct, score_name="entropy", bins=10)
    hists = [m for m in chart.panels[0].marks if isinstance(m, Hist)]
    assert [h.label for h in hists] == ["correct (70)", "incorrect (31)"]
    for h in hists:
        area = sum(v * (b - a) for v, a, b in zip(h.heights, h.edges, h.edges[1:], strict=False))
        assert area == pytest.approx(1.0, abs=1e-9)


def test_matplotlib_draws_the_same_panels():
    data = ReliabilityData.from_bins(torch.tensor([1, 2.0]), torch.tensor([0.3, 1.6]), torch.tensor([0, 2.0]))
    chart = plots.reliability_figure(data, after=data, temperature=1.5)
    fig = to_figure(chart)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 4
    assert axes[1].get_title() == "after calibration, T = 1.50 (ECE 0.233)"  # (0.3 * 1 + 0.2 * 2) / 3
    assert axes[0].get_xlim() == (0.0, 1.0)
    assert tuple(fig.get_size_inches() * fig.dpi) == pytest.approx(chart.size)


def test_save_chart_by_suffix_and_nothing_else(tmp_path):
    chart = plots.referral_figure(torch.linspace(0, 1, 5), torch.linspace(0.5, 1, 5), marker=0.2)
    svg = plots.save_chart(chart, tmp_path / "r.svg")
    png = plots.save_chart(chart, tmp_path / "r.png")
    assert ET.parse(svg).getroot().tag == f"{SVG}svg"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG" and png.endswith("r.png")
    with pytest.raises(ValueError, match=r"save_chart: '.*r\.jpg' should end in \.svg or \.png"):
        plots.save_chart(chart, tmp_path / "r.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png", "r.svg"]  # no temporary file left
