"""Flatness over training, and tick labels on log axes that do not overlap (issue 16)."""

from __future__ import annotations

import itertools
import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import convflat.analysis.figures as F
from convflat.analysis import (
    load_histories,
    plot_flatness_over_training,
    plot_hutchinson_convergence,
    plot_measure_vs_gap,
)


@pytest.fixture
def captured(monkeypatch):
    """The Figure objects the plot functions save (they are otherwise closed)."""
    figs = []
    real = F._save

    def save(fig, out, dpi=300):
        figs.append(fig)
        return real(fig, out, dpi)

    monkeypatch.setattr(F, "_save", save)
    return figs


def _check_files(paths):
    png, pdf = paths
    assert png.suffix == ".png" and pdf.suffix == ".pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image[..., :3].std() > 0.01


def _drawn(axis, which="major"):
    """The tick labels matplotlib draws: visible, non-empty, inside the view limits."""
    lo, hi = sorted(axis.get_view_interval())
    pos = 0 if axis.axis_name == "x" else 1
    return [t for t in axis.get_ticklabels(which=which)
            if t.get_visible() and t.get_text()
            and lo * (1 - 1e-9) <= t.get_position()[pos] <= hi * (1 + 1e-9)]


def _overlapping_labels(fig):
    """Pairs of visible, non-empty tick labels whose boxes intersect, per axis."""
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    bad = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = _drawn(axis, which="both")
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
            for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
                if box_a.overlaps(box_b):
                    bad.append((name, a, b))
    return bad


# --------------------------------------------------------- flatness over training


def _history(n_epochs: int, start: float, rate: float, scale: float, with_eval=True):
    out = []
    for e in range(1, n_epochs + 1):
        loss = start * math.exp(-rate * e)
        entry = {"epoch": e, "lr": 0.05, "loss": loss * 1.1, "acc": 1 - loss,
                 "conv_trace": scale / (1 + loss), "conv_relative_flatness": 3 * scale * loss}
        if with_eval:
            entry["train_loss_eval"] = loss
        out.append(entry)
    return out


def test_flatness_over_training_writes_png_and_pdf(tmp_path, captured):
    hist = {"width~8/seed~0": _history(20, 2.0, 0.3, 10.0),
            "width~8/seed~1": _history(15, 2.0, 0.4, 12.0),
            "width~32/seed~0": _history(8, 1.5, 0.8, 15.0)}
    paths = plot_flatness_over_training(hist, tmp_path / "flat", stop_loss=0.01,
                                        hue={k: k.split("/")[0] for k in hist},
                                        hue_name="width")
    _check_files(paths)
    fig = captured[-1]
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(axes) == 2
    for ax in axes:
        # losses from 2 down to ~1e-3: log x, high losses on the left (inverted)
        assert ax.get_xscale() == "log"
        left, right = ax.get_xlim()
        assert left > right
        assert ax.get_xlabel() == "training loss (train_loss_eval)"
        # one line per run plus one stop marker per run (+ the stop_loss line)
        lines = [ln for ln in ax.get_lines()
                 if len(ln.get_xdata()) > 1 and ln.get_linestyle() == "-"]
        assert len(lines) == 3
        longest = max(lines, key=lambda ln: len(ln.get_xdata()))
        x = np.asarray(longest.get_xdata())
        assert x == pytest.approx([2.0 * math.exp(-0.3 * e) for e in range(1, 21)])
    assert axes[1].get_yscale() == "log"      # relative flatness follows the loss: decades
    assert axes[0].get_yscale() == "linear"   # the trace varies by less than a factor 10
    assert _overlapping_labels(fig) == []


def test_flatness_over_training_inputs(tmp_path, captured):
    # a list of histories without the eval loss: falls back to "loss"
    paths = plot_flatness_over_training([_history(6, 1.0, 0.2, 5.0, with_eval=False)] * 2,
                                        tmp_path / "list")
    _check_files(paths)
    assert captured[-1].axes[0].get_xlabel() == "training loss (loss)"
    # train.json records read from disk, labelled by their folders
    files = []
    for run in ("a~1/seed~0", "a~2/seed~0"):
        f = tmp_path / "runs" / run / "train.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"status": "ok", "history": _history(5, 1.0, 0.5, 4.0)}))
        files.append(f)
    hist = load_histories(files)
    assert list(hist) == ["a~1/seed~0", "a~2/seed~0"] and len(hist["a~1/seed~0"]) == 5
    _check_files(plot_flatness_over_training(hist, tmp_path / "disk.png",
                                             measures=["conv_trace"]))
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_histories([tmp_path / "nothere" / "train.json"])


def test_flatness_over_training_refuses_missing_keys(tmp_path):
    hist = {"good": _history(4, 1.0, 0.5, 2.0), "bad": _history(4, 1.0, 0.5, 2.0)}
    del hist["bad"][2]["conv_relative_flatness"]
    with pytest.raises(ValueError, match=r"run 'bad', epoch 3, lacks key\(s\) "
                                         r"\['conv_relative_flatness'\]"):
        plot_flatness_over_training(hist, tmp_path / "x")
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['train_loss'\]"):
        plot_flatness_over_training({"good": hist["good"]}, tmp_path / "x",
                                    loss_key="train_loss")
    none = [dict(e, conv_trace=None, conv_relative_flatness=None) for e in hist["good"]]
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_flatness_over_training({"r": none}, tmp_path / "x")
    with pytest.raises(ValueError, match="empty"):
        plot_flatness_over_training({"r": []}, tmp_path / "x")
    with pytest.raises(ValueError, match="no 'history'"):
        plot_flatness_over_training({"r": {"status": "ok"}}, tmp_path / "x")
    assert not list(tmp_path.glob("x.*"))


# --------------------------------------------------------- log-axis tick labels


@pytest.mark.parametrize("probes", [(4, 8, 16, 32), (1, 2, 4, 8, 16, 32, 64),
                                    (10, 20, 40), (1, 4, 16, 64, 256, 1024, 4096)])
def test_hutchinson_convergence_tick_labels_do_not_overlap(tmp_path, captured, probes):
    rows = [{"method": meth, "probes": m, "stderr": f / math.sqrt(m),
             "estimate": 100 + 0.7 * f / math.sqrt(m)}
            for meth, f in (("hutchinson", 0.3), ("hutchpp", 0.1)) for m in probes]
    plot_hutchinson_convergence(pd.DataFrame(rows), 100.0, tmp_path / "h")
    assert _overlapping_labels(captured[-1]) == []
    for ax in captured[-1].axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":  # minor ticks never labelled, >= 2 major ones
                assert all(not t.get_text() for t in axis.get_ticklabels(minor=True))
                assert len(_drawn(axis)) >= 2


@pytest.mark.parametrize("lo, hi", [(2.0, 5.0), (3.0, 6.5), (-2.0, 0.5), (1.0, 12.0),
                                    (-30.0, 30.0), (0.2, 2.5)])
def test_measure_vs_gap_log_panel_labels_do_not_overlap(tmp_path, captured, lo, hi):
    rng = np.random.default_rng(0)
    n = 24
    runs = pd.DataFrame({"status": "ok", "converged": True, "hp_w": np.arange(n) % 4,
                         "hp_seed": np.arange(n) // 4, "loss_gap": rng.normal(size=n),
                         "m_pacbayes_bound": np.geomspace(10.0 ** lo, 10.0 ** hi, n),
                         "m_conv_trace": rng.uniform(1, 2, n)})
    plot_measure_vs_gap(runs, tmp_path / "mvg")
    fig = captured[-1]
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("pacbayes_bound"))
    assert panel.get_xscale() == "log"
    assert _overlapping_labels(fig) == []
    shown = _drawn(panel.xaxis)
    assert 2 <= len(shown) <= 6
