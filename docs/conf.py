"""Sphinx configuration for the cgf_optax documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import cgf_optax  # noqa: E402

project = "cgf_optax"
author = "cgf_optax contributors"
copyright = "cgf_optax contributors"
release = cgf_optax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Google-style docstrings (Args, Returns, Attributes, Example, References).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as :ivar: fields: the NamedTuple states are documented without
# :members:, so their fields are described once, from the Attributes section.
napoleon_use_ivar = True
napoleon_custom_sections = [("References", "params_style")]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Keep the aliases' names in signatures instead of their expanded unions.
autodoc_type_aliases = {
    "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
    "ScaleWeight": "ScaleWeight",
    "Overrides": "Overrides",
    "Strategy": "Strategy",
    "WholeScale": "WholeScale",
    "ModulateReference": "ModulateReference",
    "ModulateScope": "ModulateScope",
    "NormalizeScope": "NormalizeScope",
    "LossSignal": "LossSignal",
    "AxisName": "AxisName",
    "LeafAxisName": "LeafAxisName",
    "FlowMode": "FlowMode",
}

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"cgf_optax {release}"
