"""Altair charts of the reproduction experiments, saved as HTML and PNG."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def save_chart(chart, stem: Path) -> list[str]:
    """Save ``chart`` as ``STEM.html`` and ``STEM.png``; returns the names of the files written.

    The PNG is rendered by ``vl-convert-python``. When rendering fails, the
    HTML file is still written and the failure is logged.
    """
    html = stem.with_suffix(".html")
    chart.save(str(html))
    names = [html.name]
    try:
        import vl_convert

        png = vl_convert.vegalite_to_png(chart.to_json(), scale=2)
    except (ImportError, ValueError, RuntimeError) as error:
        logger.warning("PNG of %s not written: %s", stem.name, error)
        return names
    stem.with_suffix(".png").write_bytes(png)
    names.append(stem.with_suffix(".png").name)
    return names


def scatter_chart(frame: pd.DataFrame, *, x: str, y: str, color: str | None = None, title: str = ""):
    """Scatter plot of ``y`` against ``x`` with the line ``y = x``, one colour per ``color`` value."""
    import altair as alt

    encoding = {"x": alt.X(f"{x}:Q", title=x), "y": alt.Y(f"{y}:Q", title=y)}
    if color is not None:
        encoding["color"] = alt.Color(f"{color}:N", title=color)
    points = alt.Chart(frame).mark_circle(size=30, opacity=0.6).encode(**encoding)
    low = float(min(frame[x].min(), frame[y].min())) if len(frame) else 0.0
    high = float(max(frame[x].max(), frame[y].max())) if len(frame) else 1.0
    diagonal = alt.Chart(pd.DataFrame({x: [low, high], y: [low, high]})).mark_line(color="gray", strokeDash=[4, 4]).encode(
        x=f"{x}:Q", y=f"{y}:Q"
    )
    return (points + diagonal).properties(title=title, width=420, height=420)


# Points drawn per line of a curve chart, and rows per chart: Altair refuses to embed more than 5,000 rows.
CURVE_POINTS = 200
CHART_ROWS = 4000


def thin_curves(frame: pd.DataFrame, x: str, max_points: int = CURVE_POINTS) -> pd.DataFrame:
    """Keep the rows at no more than ``max_points`` evenly spaced ``x`` values, the first and last included."""
    values = np.sort(frame[x].unique())
    if len(values) <= max_points:
        return frame
    sampled_values = values[np.unique(np.linspace(0, len(values) - 1, max_points).round().astype(int))]
    return frame[frame[x].isin(sampled_values)].reset_index(drop=True)


def curve_chart(frame: pd.DataFrame, *, x: str, y: str, color: str, facet: str | None = None, title: str = ""):
    """Line chart of ``y`` against ``x``, one line per ``color`` value, one panel per ``facet`` value.

    Long curves are drawn at no more than :data:`CURVE_POINTS` evenly spaced
    ``x`` values, and at fewer when the chart would exceed :data:`CHART_ROWS`
    rows. The CSV tables keep every point.
    """
    import altair as alt

    lines = max(1, len(frame.drop_duplicates([color] if facet is None else [color, facet])))
    thinned = thin_curves(frame, x, max(2, min(CURVE_POINTS, CHART_ROWS // lines)))
    chart = alt.Chart(thinned).mark_line().encode(
        x=alt.X(f"{x}:Q", title=x), y=alt.Y(f"{y}:Q", title=y), color=alt.Color(f"{color}:N", title=color)
    ).properties(width=360, height=300)
    if facet is not None:
        chart = chart.facet(column=alt.Column(f"{facet}:N", title=facet))
    return chart.properties(title=title)


def bar_chart(frame: pd.DataFrame, *, x: str, y: str, color: str | None = None, title: str = ""):
    """Grouped bar chart of ``y`` per ``x`` value, bars coloured by ``color``."""
    import altair as alt

    encoding = {"x": alt.X(f"{x}:N", title=x), "y": alt.Y(f"{y}:Q", title=y, scale=alt.Scale(domain=[0, 1]))}
    if color is not None:
        encoding["color"] = alt.Color(f"{color}:N", title=color)
        encoding["xOffset"] = alt.XOffset(f"{color}:N")
    return alt.Chart(frame).mark_bar().encode(**encoding).properties(title=title, width=360, height=300)
