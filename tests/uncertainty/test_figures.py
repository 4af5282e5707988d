"""The uncertainty figures (regfw.uncertainty.figures): written as SVG and PNG and read back, every
axis labelled, every figure titled, legends that never cover data (checked by geometry), names that
say what they mean, and the user's matplotlib state left alone."""
from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Callable
from xml.sax.saxutils import escape

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from regfw.uncertainty.figures.calibration import coverage_figure, reliability_figure
from regfw.uncertainty.figures.canvas import DPI
from regfw.uncertainty.figures.files import save_figure
from regfw.uncertainty.figures.histograms import density, edges, ood_histogram_figure, score_histogram_figure
from regfw.uncertainty.figures.labels import score_label
from regfw.uncertainty.figures.selective import referral_figure, risk_coverage_figure
from regfw.uncertainty.metrics import ReliabilityData, retained_curve
from regfw.uncertainty.ood import OOD_SCORES
from regfw.uncertainty.selective import risk_coverage

SVG = "{http://www.w3.org/2000/svg}"


def _reliability(n: int, seed: int = 0) -> ReliabilityData:
    """Bins of ``n`` inputs: ``n`` small is a short run (few, tall, sparse bars)."""
    g = torch.Generator().manual_seed(seed)
    conf = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    correct = (torch.rand(n, generator=g, dtype=torch.float64) < conf).double()
    idx = (conf * 15).long().clamp_max(14)
    count = torch.bincount(idx, minlength=15).double()
    return ReliabilityData.from_bins(count, torch.bincount(idx, conf, 15), torch.bincount(idx, correct, 15))


def _scores(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(n, generator=g, dtype=torch.float64)
    return score, torch.rand(n, generator=g, dtype=torch.float64) > score  # unsure inputs are wrong more often


def _ood(n_in: int, n_out: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return ({k: torch.rand(n_in, generator=g, dtype=torch.float64) for k in OOD_SCORES},
            {k: 0.3 + torch.rand(n_out, generator=g, dtype=torch.float64) for k in OOD_SCORES})


def _figures(n: int) -> dict[str, Callable[[], Figure]]:
    """Every figure the callback draws, from ``n`` inputs."""
    score, correct = _scores(n)
    fr, acc = retained_curve(score, correct.double())
    return {
        "reliability": lambda: reliability_figure(_reliability(n)),
        "reliability_calibrated": lambda: reliability_figure(_reliability(n), after=_reliability(n, 5),
                                                             temperature=1.5),
        "coverage": lambda: coverage_figure([0.5, 0.9, 0.95], [0.42, 0.88, 0.97]),
        "referral": lambda: referral_figure(fr, acc, marker=0.2),
        "referral_rmse": lambda: referral_figure(fr, 1 - acc, ylabel="RMSE on retained"),
        "score_hist": lambda: score_histogram_figure(score, correct, score_name="mutual_information"),
        "score_hist_regression": lambda: score_histogram_figure(score, None, score_name="variance",
                                                                task="regression"),
        "risk_coverage": lambda: risk_coverage_figure(risk_coverage(score, correct.double())),
        "ood_hist": lambda: ood_histogram_figure(*_ood(n, n // 2 + 1)),
    }


SIZES = (12, 450)  # a short run and a demo-sized one
CASES = [(name, n) for n in SIZES for name in _figures(n)]


def _draw(make: Callable[[], Figure]) -> Figure:
    fig = make()
    fig.canvas.draw()  # the layout the files get
    return fig


def _visible_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.get_visible()]


def _words(fig: Figure) -> list[str]:
    """Every title, axis label and legend entry of ``fig``."""
    out = [fig.get_suptitle()]
    for ax in _visible_axes(fig):
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
    out += [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    return [w for w in out if w]


@pytest.mark.parametrize(("name", "n"), CASES)
def test_every_axes_labelled_and_titled_and_the_legend_covers_nothing(name, n):
    fig = _draw(_figures(n)[name])
    axes = _visible_axes(fig)
    assert axes
    for ax in axes:
        assert ax.get_ylabel(), (name, "y label")
        # an x label on every axes, or on the axes under it that shares its x axis
        shared = [o for o in ax.get_shared_x_axes().get_siblings(ax) if o is not ax]
        assert ax.get_xlabel() or any(o.get_xlabel() for o in shared), (name, "x label")
        # a title on every axes, or on the axes above it that shares its x axis (reliability's counts)
        assert ax.get_title() or any(o.get_title() for o in shared), (name, "title")
    assert len(fig.legends) == 1 and [t.get_text() for t in fig.legends[0].get_texts()], name
    # the legend lies inside the figure and covers no data, label or title of any axes
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    fig_box = fig.bbox
    assert (fig_box.x0 - 0.5 <= legend.x0 and legend.x1 <= fig_box.x1 + 0.5
            and fig_box.y0 - 0.5 <= legend.y0 and legend.y1 <= fig_box.y1 + 0.5), (name, legend, fig_box)
    for ax in axes:
        data = [*ax.lines, *ax.patches, *ax.collections, *ax.texts]
        assert data, name
        for artist in data:
            box = artist.get_window_extent(renderer)
            assert not legend.overlaps(box), (name, artist, legend, box)
        # nor the axes' labels, tick labels and title
        assert not legend.overlaps(ax.get_tightbbox(renderer)), (name, legend, ax.get_tightbbox(renderer))


@pytest.mark.parametrize("name", list(_figures(SIZES[0])))
def test_written_as_svg_and_png_and_read_back(name, tmp_path):
    fig = _figures(40)[name]()
    svg = save_figure(fig, tmp_path / f"{name}.svg")
    png = save_figure(fig, tmp_path / f"{name}.png")
    text = (tmp_path / f"{name}.svg").read_text()
    assert ET.fromstring(text).tag == f"{SVG}svg" and svg.endswith(".svg")
    for word in _words(fig):  # SVG text is drawn as paths, each with its text as a comment
        for line in word.split("\n"):
            assert escape(line) in text, (name, line)
    raw = (tmp_path / f"{name}.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and png.endswith(".png")
    width, height = struct.unpack(">II", raw[16:24])  # the IHDR chunk
    assert (width, height) == tuple(round(v * DPI) for v in fig.get_size_inches())
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.png", f"{name}.svg"]  # no temporary file


def test_an_svg_is_the_same_text_each_time(tmp_path):
    save_figure(coverage_figure([0.5, 0.9], [0.4, 0.8]), tmp_path / "a.svg")
    save_figure(coverage_figure([0.5, 0.9], [0.4, 0.8]), tmp_path / "b.svg")
    assert "<dc:date>" not in (tmp_path / "a.svg").read_text()


def test_only_svg_and_png_are_written(tmp_path):
    with pytest.raises(ValueError, match=r"save_figure: '.*r\.jpg' should end in \.svg or \.png"):
        save_figure(coverage_figure([0.5], [0.5]), tmp_path / "r.jpg")
    assert list(tmp_path.iterdir()) == []


def test_score_names_say_what_they_mean():
    fig = _draw(lambda: ood_histogram_figure(*_ood(50, 20)))
    xlabels = [ax.get_xlabel() for ax in _visible_axes(fig)]
    assert xlabels == [score_label(k) for k in OOD_SCORES] and xlabels[0] == "1 - max prob"
    words = _words(fig)
    assert not any(k in w for w in words for k in OOD_SCORES if "_" in k or k == "msp"), words
    assert score_label("variance", "regression") == "predictive variance"
    assert score_label("some_new_score") == "some new score"


def test_ood_panels_give_the_auroc_of_each_score():
    inside = {"msp": torch.tensor([0.1, 0.2, 0.3, 0.9])}
    outside = {"msp": torch.tensor([0.5, 0.8, 0.95])}  # 0.9 beats 2 of 3: AUROC (4 * 3 - 2) / 12
    fig = _draw(lambda: ood_histogram_figure(inside, outside))
    assert _visible_axes(fig)[0].get_title() == f"AUROC {10 / 12:.3f}"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["in distribution (4)", "out of distribution (3)"]


def test_risk_coverage_reference_lines_are_labelled_with_their_values():
    score, correct = _scores(200)
    rc = risk_coverage(score, correct.double())
    fig = _draw(lambda: risk_coverage_figure(rc))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["selective risk", f"coverage 80%: risk {rc.risk_at(0.8):.3f}",
                      f"coverage 95%: risk {rc.risk_at(0.95):.3f}",
                      f"error rate, all answered: {float(1 - correct.double().mean()):.3f}"]
    ax = _visible_axes(fig)[0]
    assert [float(line.get_xdata()[0]) for line in ax.lines[1:3]] == [0.8, 0.95]
    assert ax.get_title().startswith("Risk-coverage curve\nAURC ")


def test_reliability_bars_only_in_filled_bins_with_their_counts():
    count = torch.tensor([0, 5, 0, 7, 2.0])
    data = ReliabilityData.from_bins(count, torch.tensor([0, 1.5, 0, 4.2, 1.8]), torch.tensor([0, 1, 0, 5, 2.0]))
    fig = _draw(lambda: reliability_figure(data))
    top, bottom = _visible_axes(fig)
    assert len(top.patches) == 2 * 3 and len(bottom.patches) == 3  # accuracy and gap bars, counts: 3 filled bins
    assert [t.get_text() for t in bottom.texts] == ["5", "7", "2"]
    assert top.get_title() == f"Reliability diagram (ECE {data.ece:.3f})"
    heights = [p.get_height() for p in top.patches[:3]]
    assert heights == pytest.approx([1 / 5, 5 / 7, 1.0])


def test_calibrated_reliability_has_a_column_each_and_one_legend():
    data = ReliabilityData.from_bins(torch.tensor([1, 2.0]), torch.tensor([0.3, 1.6]), torch.tensor([0, 2.0]))
    fig = _draw(lambda: reliability_figure(data, after=data, temperature=1.5))
    axes = _visible_axes(fig)
    assert len(axes) == 4 and fig.get_suptitle() == "Reliability diagram"
    assert axes[1].get_title() == "after calibration, T = 1.50 (ECE 0.233)"  # (0.3 * 1 + 0.2 * 2) / 3
    assert axes[0].get_xlim() == (0.0, 1.0)
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 4


def test_density_histograms_have_unit_area():
    values = np.linspace(0, 1, 101)
    bin_edges = edges(values, 10)
    for group in (values[values > 0.3], values[values <= 0.3]):
        assert float((density(group, bin_edges) * np.diff(bin_edges)).sum()) == pytest.approx(1.0, abs=1e-12)
    assert density(np.array([np.nan]), bin_edges).tolist() == [0.0] * 10
    assert edges(np.array([2.0, 2.0]), 3)[-1] > 2.0  # equal values still get a bin


def test_score_histogram_legend_counts_each_outcome():
    score = torch.linspace(0, 1, 101, dtype=torch.float64)
    fig = _draw(lambda: score_histogram_figure(score, score > 0.3, score_name="entropy", bins=10))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["correct (70)", "incorrect (31)"]
    assert _visible_axes(fig)[0].get_xlabel() == "predictive entropy (nats)"


def test_drawing_leaves_the_users_matplotlib_alone(tmp_path):
    """In a fresh process: ``import regfw`` loads no matplotlib; drawing and writing the callback's
    figures registers no pyplot figure and changes neither the user's current figure, nor the
    backend, nor any setting."""
    script = textwrap.dedent(f"""
        import sys
        import regfw
        assert "matplotlib" not in sys.modules, "matplotlib loaded by import regfw"
        import matplotlib
        matplotlib.use("svg")
        import matplotlib.pyplot as plt
        mine = plt.figure()
        before = dict(matplotlib.rcParams)
        import torch
        from regfw.uncertainty.figures.jobs import draw_plots
        data = {{"task": "regression", "score_name": "variance", "coverage": {{0.5: 0.4, 0.9: 0.8}},
                 "referral": (torch.linspace(0, 1, 9), torch.linspace(1, 0, 9)), "score": torch.rand(9)}}
        written = draw_plots(data, {str(tmp_path)!r}, [], 0, "mc/", "png")
        assert sorted(written) == ["coverage", "referral", "score_hist"], written
        assert plt.get_fignums() == [mine.number] and plt.gcf() is mine, plt.get_fignums()
        assert matplotlib.get_backend() == "svg"
        assert dict(matplotlib.rcParams) == before
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
