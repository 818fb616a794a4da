"""Validate page: approximate influence against exact retraining, as written by segflu validate."""

from __future__ import annotations

import streamlit as st

import pages as common

st.title("Validate")
project, project_dir = common.require_project()
st.info("Run segflu validate on this project to compare approximate influence with exact retraining.")
