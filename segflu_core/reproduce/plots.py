"""Altair charts of the reproduction experiments, saved as HTML and PNG."""

from __future__ import annotations

import logging
from pathlib import Path

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


def curve_chart(frame: pd.DataFrame, *, x: str, y: str, color: str, facet: str | None = None, title: str = ""):
    """Line chart of ``y`` against ``x``, one line per ``color`` value, one panel per ``facet`` value."""
    import altair as alt

    chart = alt.Chart(frame).mark_line().encode(
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
