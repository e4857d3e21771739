"""Sphinx configuration: Markdown pages (MyST), the furo theme, autodoc of the public API."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "_ext")]

import configref  # noqa: E402

configref.write(HERE / "_generated")

project = "greenpool"
author = "greenpool contributors"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_generated", "why.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = "greenpool"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
