"""Charts of the claims' results, drawn with matplotlib (Agg canvas: no display needed).

Two kinds, both with a panel per quantity side by side:

* :func:`line_chart`: series of ``(x, y)`` points per panel (training curves, ``e(t)``, gradient
  norm histograms as step lines); series ``i`` has colour ``PALETTE[i]`` in every panel and one
  entry in a single legend placed *below* the panels, outside the data, however many runs.
* :func:`bar_chart`: one horizontal bar per category in each panel, categories named on the
  shared y axis (no legend), the value written at the end of each bar.

Both write the PNG atomically and return where the panels and the legend landed (pixel boxes in
the PNG), which is what tests check the drawing against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from asd3d.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PALETTE",
    "BarPanel",
    "ChartLayout",
    "LinePanel",
    "Series",
    "bar_chart",
    "line_chart",
]

#: Distinct RGB colours, used in order (one per run or curve; one per metric in bar charts).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
DPI = 100
#: Line styles, cycled with the series: a curve drawn over an equal one leaves the other visible.
LINE_STYLES = ("-", "--", "-.", ":")
#: ``(left, top, right, bottom)`` in pixels of the saved PNG, origin at its top-left corner.
Box = tuple[int, int, int, int]


def colour(index: int) -> tuple[float, float, float]:
    """``PALETTE[index]`` (cycling) as matplotlib's 0-1 floats."""
    r, g, b = PALETTE[index % len(PALETTE)]
    return r / 255.0, g / 255.0, b / 255.0


@dataclass(frozen=True)
class Series:
    """One curve: points ``(x[i], y[i])`` (NaN ``y``: no point there) and an optional mark, a
    short tick at ``x = mark`` on the panel's top edge (e.g. a median)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    mark: float | None = None


@dataclass(frozen=True)
class LinePanel:
    """One panel of a line chart: its series in legend order, axis labels and scales."""

    title: str
    series: Sequence[Series]
    x_label: str = ""
    y_label: str = ""
    y_limits: tuple[float, float] | None = None  # None: fitted to the data
    log_x: bool = False
    log_y: bool = False
    steps: bool = False  # draw each series as a histogram outline (steps centred on x)
    integer_x: bool = False  # ticks only at whole numbers (e.g. optimisation steps)


@dataclass(frozen=True)
class BarPanel:
    """One panel of a bar chart: a value per category (None or NaN: no bar)."""

    title: str
    values: Sequence[float | None]
    x_limits: tuple[float, float] | None = None  # None: from 0 to the largest value
    format: Callable[[float], str] = field(default=lambda v: f"{v:.3g}")


@dataclass(frozen=True)
class ChartLayout:
    """Where things landed in the PNG: one box per panel's plot area, and the legend's."""

    size: tuple[int, int]
    panels: list[Box]
    legend: Box | None


def _figure(num_panels: int, panel_size: tuple[float, float], extra_height: float) -> Figure:
    from matplotlib.figure import Figure

    width, height = panel_size
    return Figure(
        figsize=(width * max(1, num_panels), height + extra_height), dpi=DPI, layout="constrained"
    )


def _box(extent, height: int) -> Box:
    # Display coordinates start at the bottom-left; PNG rows start at the top.
    return (
        math.floor(extent.x0),
        math.floor(height - extent.y1),
        math.ceil(extent.x1),
        math.ceil(height - extent.y0),
    )


def _save(figure: Figure, path: Path, axes: Sequence, legend) -> ChartLayout:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # runs the constrained layout: extents below are final
    width, height = canvas.get_width_height()
    renderer = canvas.get_renderer()
    layout = ChartLayout(
        size=(width, height),
        panels=[_box(ax.get_window_extent(renderer), height) for ax in axes],
        legend=_box(legend.get_window_extent(renderer), height) if legend is not None else None,
    )
    with atomic_path(path) as tmp:
        canvas.print_png(str(tmp))
    return layout


def line_chart(
    path: Path,
    panels: Sequence[LinePanel],
    markers: bool = True,
    panel_size: tuple[float, float] = (3.4, 2.6),
) -> ChartLayout:
    """Panels side by side; series ``i`` of every panel in ``PALETTE[i]`` and
    ``LINE_STYLES[i]``; one legend of the first panel's series labels below all panels.
    Returns where the panels and the legend are."""
    if not panels:
        raise ValueError("a line chart needs at least one panel")
    from matplotlib.ticker import MaxNLocator

    labels = [s.label for s in panels[0].series]
    # Legend entries side by side as far as the figure's width allows (about 7 px per
    # character at 9 pt, plus the line sample), then further rows.
    entry = 7 * max(len(label) for label in labels) + 50
    columns = max(1, min(len(labels), int(panel_size[0] * len(panels) * DPI) // entry))
    rows = math.ceil(len(labels) / columns)
    figure = _figure(len(panels), panel_size, extra_height=0.25 * rows)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    handles = []
    for ax, panel in zip(axes, panels, strict=True):
        for i, series in enumerate(panel.series):
            (line,) = ax.plot(
                series.x,
                series.y,
                color=colour(i),
                linewidth=2.0,
                linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                marker="o" if markers else None,
                markersize=5,
                drawstyle="steps-mid" if panel.steps else "default",
                label=series.label,
            )
            if ax is axes[0]:
                handles.append(line)
            if series.mark is not None:  # in the top 8% of the panel, kept free of data
                ax.axvline(series.mark, ymin=0.92, ymax=1.0, color=colour(i), linewidth=3)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.x_label, fontsize=9)
        ax.set_ylabel(panel.y_label, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, color="0.9", linewidth=0.8)
        if panel.log_x:
            ax.set_xscale("log")
        if panel.log_y:
            ax.set_yscale("log")
        if panel.y_limits is not None:
            ax.set_ylim(*panel.y_limits)
        elif any(series.mark is not None for series in panel.series):
            low, high = ax.get_ylim()
            ax.set_ylim(low, high + (high - low) * 0.1)
        if panel.integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend = figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=9)
    return _save(figure, path, axes, legend)


def bar_chart(
    path: Path,
    categories: Sequence[str],
    panels: Sequence[BarPanel],
    panel_size: tuple[float, float] = (2.6, 0.6),
) -> ChartLayout:
    """Horizontal bars: a row per category (named once, on the left), a panel per quantity in
    ``PALETTE[panel index]``, each value written after its bar."""
    if not panels or not categories:
        raise ValueError("a bar chart needs at least one panel and one category")
    height = panel_size[1] + 0.28 * len(categories)
    figure = _figure(len(panels), (panel_size[0], height), extra_height=0.0)
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    rows = list(range(len(categories)))
    for m, (ax, panel) in enumerate(zip(axes, panels, strict=True)):
        known = [
            (row, float(v))
            for row, v in zip(rows, panel.values, strict=True)
            if v is not None and not math.isnan(v)
        ]
        ax.barh([r for r, _ in known], [v for _, v in known], color=colour(m), height=0.7)
        high = max((v for _, v in known), default=1.0)
        low_limit, high_limit = panel.x_limits or (0.0, high if high > 0 else 1.0)
        ax.set_xlim(low_limit, high_limit + 0.35 * (high_limit - low_limit))  # room for values
        for row, value in known:
            ax.text(value, row, " " + panel.format(value), va="center", fontsize=8)
        ax.set_title(panel.title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.set_yticks(rows, list(categories))
        if m == 0:  # shared y: inverting once puts row 0 on top
            ax.invert_yaxis()
        ax.grid(True, axis="x", color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
    return _save(figure, path, axes, None)
