"""segflu web app: debug the training data of a named-entity tagger in the browser.

Run it with ``segflu app [PROJECT]`` or ``streamlit run app.py``. The project
folder to open comes from the ``SEGFLU_PROJECT`` environment variable, or is
chosen on the Project page.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="segflu", layout="wide")

PAGES = [
    st.Page("pages/project.py", title="Project", default=True),
    st.Page("pages/errors.py", title="Errors"),
    st.Page("pages/explain.py", title="Explain"),
    st.Page("pages/noise.py", title="Noise"),
    st.Page("pages/validate.py", title="Validate"),
    st.Page("pages/review.py", title="Review"),
]

st.navigation(PAGES).run()
