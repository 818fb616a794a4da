"""Noise page: training documents ranked by how likely their annotations are wrong."""

from __future__ import annotations

import streamlit as st

from pages import common

st.title("Noise")
project, project_dir = common.require_project()
st.info("Noise ranking is not available for this project yet.")
