"""Sphinx configuration: `sphinx-build -W --keep-going docs docs/_build/html`.

Guides and pages are MyST Markdown; the API reference is autodoc over the
Google-style docstrings (napoleon). The experiments gallery is generated from
experiments/results/*.json at every build (docs/_ext/gallery.py).
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'docs' / '_ext'))

import bnjax  # noqa: E402

project = 'bnjax'
author = 'the bnjax authors'
copyright = '2026, the bnjax authors'
release = version = bnjax.__version__

extensions = [
  'sphinx.ext.autodoc',
  'sphinx.ext.napoleon',
  'sphinx.ext.mathjax',
  'sphinx-mathjax-offline',  # MathJax bundled: formulas render with no network
  'sphinx.ext.viewcode',
  'myst_parser',
  'gallery',
]
source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
exclude_patterns = ['_build']
myst_enable_extensions = ['dollarmath', 'colon_fence']
myst_heading_anchors = 3

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No intersphinx: the build never touches the network.

html_theme = 'furo'
html_title = f'bnjax {release}'
html_static_path = ['_static']
html_css_files = ['custom.css']
# Every cross-reference must resolve (a typo in {func}`bnjax.x` fails the
# build); only types of other libraries, which have no inventory offline, are
# exempt.
nitpicky = True
nitpick_ignore_regex = [
  ('py:class', r'(jax|jaxlib|numpy|flax|equinox|collections|typing)\..*'),
  ('py:class', r'Array'),
  # Constructor signatures as the modules write them (flax's own aliases).
  ('py:class', r'(nnx|Mapping)\b.*'),
]
