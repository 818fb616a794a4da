"""Charts of the reproduction experiments on curves longer than Altair embeds by default."""

from __future__ import annotations

import numpy as np
import pandas as pd

from segflu_core.reproduce.plots import CURVE_POINTS, curve_chart, thin_curves


def long_curves(documents: int = 900) -> pd.DataFrame:
    frames = []
    for noise in ("org_to_loc", "random"):
        for method in range(20):
            found = np.cumsum(np.random.default_rng(method).random(documents) < 0.1) / documents
            frames.append(pd.DataFrame({"noise": noise, "method": f"m{method}",
                                        "documents": np.arange(1, documents + 1), "found": found}))
    return pd.concat(frames, ignore_index=True)


def test_thin_curves_keeps_ends_and_values():
    frame = long_curves()
    thinned = thin_curves(frame, "documents")
    drawn = np.sort(thinned["documents"].unique())
    assert len(drawn) == CURVE_POINTS
    assert drawn[0] == 1
    assert drawn[-1] == 900
    merged = thinned.merge(frame, on=["noise", "method", "documents"], suffixes=("", "_full"))
    assert len(merged) == len(thinned)
    np.testing.assert_array_equal(merged["found"], merged["found_full"])


def test_short_curves_unchanged():
    frame = long_curves(documents=50)
    assert thin_curves(frame, "documents") is frame


def test_curve_chart_of_a_full_corpus_renders(tmp_path):
    chart = curve_chart(long_curves(), x="documents", y="found", color="method", facet="noise")
    spec = chart.to_dict()
    rows = sum(len(values) for values in spec.get("datasets", {}).values())
    assert 0 < rows <= 5000
