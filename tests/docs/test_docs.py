"""The documentation site: every public name in the reference, every guide's
code run, the gallery generated from the committed results, and the build
itself with warnings as errors."""

import html.parser
import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.docs import run_guide

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / 'docs'
GUIDES = sorted((DOCS / 'guides').glob('*.md'))
PUBLIC_MODULES = [
  'bnjax',
  'bnjax.linen',
  'bnjax.nnx',
  'bnjax.equinox',
  'bnjax.interop',
  'bnjax.precise',
  'bnjax.training',
]


def public_names():
  for mod in PUBLIC_MODULES:
    m = importlib.import_module(mod)
    for name in m.__all__:
      yield mod, name, getattr(m, name)


python_blocks = run_guide.python_blocks


def test_every_public_name_is_in_the_api_reference():
  text = '\n'.join(p.read_text() for p in (DOCS / 'api').glob('*.md'))
  documented = set(
    re.findall(r'^\.\. auto(?:function|class):: ([\w.]+)', text, re.M)
  )
  expected = {f'{mod}.{name}' for mod, name, _ in public_names()}
  assert expected - documented == set(), 'add these to docs/api/*.md'
  assert documented - expected == set(), 'not public: remove from docs/api'


@pytest.mark.parametrize(
  'qualname,obj',
  [(f'{m}.{n}', o) for m, n, o in public_names()],
  ids=lambda v: v if isinstance(v, str) else '',
)
def test_every_public_name_has_arguments_and_an_example(qualname, obj):
  """The reference shows what the docstring has: the argument docs and a
  doctest example (which `--doctest-modules` runs)."""
  doc = inspect.getdoc(obj) or ''
  assert re.search(r'^(Args|Attributes):$', doc, re.M), qualname
  assert re.search(r'^Example:\n\s+>>> ', doc, re.M), qualname
  # One argument per entry: "a, b: ..." renders as one parameter named "a, b"
  call = vars(obj).get('__call__') if inspect.isclass(obj) else None
  for d in (doc, inspect.getdoc(call) or ''):
    shared = re.findall(r'^ {2}(\w+, \w+):', d, re.M)
    assert not shared, (qualname, shared)


def test_public_modules_export_only_what_they_define_or_reexport_deliberately():
  for mod in PUBLIC_MODULES[1:]:
    m = importlib.import_module(mod)
    assert sorted(m.__all__) == sorted(set(m.__all__)), mod
    for name in m.__all__:
      assert getattr(m, name).__module__.startswith('bnjax'), (mod, name)


HEAVY_GUIDES = {'training_loops', 'sync'}  # about 20 and 10 CPU-seconds
PAGES = GUIDES + [DOCS / 'index.md']


def _pages():
  return [
    pytest.param(p, marks=[pytest.mark.heavy] * (p.stem in HEAVY_GUIDES))
    for p in PAGES
  ]


@pytest.mark.parametrize('guide', _pages(), ids=lambda p: p.stem)
def test_guide_code_runs(guide):
  """Each guide's ```python blocks run in order in one namespace, as a
  reader would paste them, here on the suite's 8 CPU devices (sketches that
  cannot run, a multi-host launch, are fenced as text)."""
  assert python_blocks(guide), f'{guide.name} has no runnable example'
  run_guide.run(guide, namespace={'__name__': f'docs_{guide.stem}'})


@pytest.mark.parametrize('guide', _pages(), ids=lambda p: p.stem)
def test_guide_code_runs_on_one_device(guide):
  """The same on one CPU device, a fresh process without the suite's 8
  (regression: training_loops built Mesh(jax.devices()[:8]) and failed on
  one device with a bare AssertionError; sync's BN-groups block raised
  IndexError)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = str(ROOT)  # the contributing guide imports tests/
  proc = subprocess.run(
    [sys.executable, str(ROOT / 'tests/docs/run_guide.py'), str(guide)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'ran on 1 device(s)' in proc.stdout, proc.stdout


def test_no_guide_block_is_a_sketch_fenced_as_python():
  """A block that cannot run is fenced as text (regression: sync.md's
  multi-host launch was fenced as python and skipped by name)."""
  for page in PAGES:
    for block in python_blocks(page):
      assert 'jax.distributed.initialize' not in block, page.name


def test_guides_cover_the_topics_the_site_promises():
  assert {p.stem for p in GUIDES} == {
    'getting_started',
    'migrating',
    'sync',
    'variants',
    'numerics',
    'performance',
    'contributing',
    'training_loops',
    'equinox_haiku',
  }


def test_gallery_is_generated_from_every_committed_result(tmp_path):
  sys.path.insert(0, str(DOCS / '_ext'))
  try:
    import gallery
  finally:
    sys.path.remove(str(DOCS / '_ext'))
  names = gallery.generate(tmp_path)
  assert names == list(gallery.registry())
  for name in names:
    result = json.loads(
      (ROOT / 'experiments' / 'results' / f'{name}.json').read_text()
    )
    assert result['quick'] is False, f'{name}.json is a quick run'
    page = (tmp_path / f'{name}.md').read_text()
    assert f'({name}.png)' in page and (tmp_path / f'{name}.png').exists()
    assert '**Claim' in page and '**Setup' in page, name
    assert result['commit'] in page
    for key, value in result['summary'].items():
      if key.startswith('holds'):
        assert f'`{key}` = **{"yes" if value else "no"}**' in page
      else:
        assert f'| `{gallery._cell(key)}` | {gallery._cell(value)} |' in page
  index = (tmp_path / 'index.md').read_text()
  assert all(f'[{n}]({n}.md)' in index for n in names)


def test_docs_build_with_warnings_as_errors(tmp_path):
  """The README's docs command, in a temporary directory: warnings
  (a broken cross-reference, a bad docstring, a missing page) fail it, and
  the inventory holds every public name."""
  pytest.importorskip('sphinx', reason='install the docs extra: .[docs]')
  pytest.importorskip('myst_parser', reason='install the docs extra: .[docs]')
  out = tmp_path / 'html'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'sphinx',
      '-W',
      '--keep-going',
      '-q',
      '-b',
      'html',
      str(DOCS),
      str(out),
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,  # no wall-clock timeout: the build is bounded work
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  from sphinx.util.inventory import InventoryFile

  with open(out / 'objects.inv', 'rb') as f:
    inv = InventoryFile.load(f, '', lambda base, uri: uri)
  objects = (
    {n for kind in inv.values() for n in kind}
    if isinstance(inv, dict)
    else {item.name for item in inv}
  )
  for mod, name, _ in public_names():
    assert f'{mod}.{name}' in objects, f'{mod}.{name} missing from the site'
  for page in ['index', 'guides/numerics', 'api/core', 'gallery/index']:
    assert (out / f'{page}.html').exists(), page
  # Real signatures: nnx's metaclass made them (*args, **kwargs).
  for page, cls, arg in (
    ('nnx', 'BatchNorm', 'num_features'),
    ('nnx', 'BatchRenorm', 'promote_dtype'),
    ('linen', 'BatchNorm', 'use_running_average'),
  ):
    html = (out / 'api' / f'{page}.html').read_text()
    sig = re.search(rf'id="bnjax\.{page}\.{cls}".*?</dt>', html, re.S)
    assert sig and arg in sig.group(0) and 'kwargs' not in sig.group(0), (
      page,
      cls,
    )
  _assert_every_table_fits_at_1280px(out)


class _Tables(html.parser.HTMLParser):
  """The cell texts of every ``table.docutils`` of a page, row by row."""

  def __init__(self):
    super().__init__()
    self.tables, self.cell = [], None

  def handle_starttag(self, tag, attrs):
    if tag == 'table' and 'docutils' in (dict(attrs).get('class') or ''):
      self.tables.append([])
    elif tag == 'tr' and self.tables:
      self.tables[-1].append([])
    elif tag in ('td', 'th') and self.tables:
      self.cell = []

  def handle_endtag(self, tag):
    if tag in ('td', 'th') and self.cell is not None:
      self.tables[-1][-1].append(''.join(self.cell))
      self.cell = None

  def handle_data(self, data):
    if self.cell is not None:
      self.cell.append(data)


def _assert_every_table_fits_at_1280px(site):
  """No table column hidden at 1280 px: each table's narrowest layout, every
  cell wrapped at its spaces (custom.css: white-space normal, 0.8em), fits
  furo's article, 46em of 16 px (at 1280 px the sidebar, the article and the
  table of contents all show) less the table wrapper's 0.2rem each side, so
  furo never scrolls a column out of view. The estimate is pessimistic: 0.6em
  a character (digits and lowercase letters of a sans font are narrower),
  plus each cell's padding (0.25rem each side), its paragraph margin (0.25rem
  each side) and a 1 px border."""
  css = (DOCS / '_static' / 'custom.css').read_text()
  rule = re.search(r'table\.docutils th \{([^}]*)\}', css).group(1)
  assert 'white-space: normal' in rule and 'font-size: 0.8em' in rule, rule
  char_px, cell_px, width_px = 0.8 * 16 * 0.6, 4 * 4 + 1, 46 * 16 - 2 * 3.2
  too_wide = []
  for page in sorted(site.rglob('*.html')):
    parser = _Tables()
    parser.feed(page.read_text())
    for rows in parser.tables:
      longest = {}  # column -> its longest unbreakable word
      for row in rows:
        for i, cell in enumerate(row):
          words = cell.split() or ['']
          longest[i] = max(longest.get(i, 0), *map(len, words))
      px = sum(n * char_px + cell_px for n in longest.values())
      if px > width_px:
        too_wide.append((page.relative_to(site).as_posix(), rows[0], px))
  assert not too_wide, too_wide


def _between(path, marker):
  text = path.read_text()
  match = re.search(
    f'<!-- {marker}:start -->\n(.*?)\n?<!-- {marker}:end -->', text, re.S
  )
  assert match, f'{path.name} has no {marker} markers'
  return match.group(1)


def test_numerics_guide_bar_holds_in_the_committed_measurement():
  """The guide's 1e-5 bar, in the run its table is generated from
  (test_readme.py checks the table is that run's)."""
  from benchmarks import _timing

  rows = _timing.latest('numerics')['rows']
  assert max(r['rel_err'] for r in rows if r['impl'] == 'bnjax') <= 1e-5


def test_docs_and_readme_list_exactly_the_deliberate_differences():
  """Each skip in tests/peer/ has one bullet in the migration guide and in
  the README, and nothing more."""
  from tests.peer.conftest import DIFFERENCES

  expected = sorted(t for t, _ in DIFFERENCES.values())
  for path in (DOCS / 'guides' / 'migrating.md', ROOT / 'README.md'):
    section = _between(path, 'differences')
    bullets = re.findall(r'^- \*\*(.+?)\.\*\*', section, re.M)
    assert sorted(bullets) == expected, path.name


def test_fold_figures_are_the_committed_measurement():
  from benchmarks import _timing

  rows = _timing.latest('fold')['rows']
  text = ' '.join(_between(DOCS / 'guides' / 'migrating.md', 'fold').split())
  for row in rows:
    assert f'{row["speedup"]:.2f}x' in text, row
  rel = max(r['max_rel_logit_diff'] for r in rows)
  assert f'within {rel:.1e} of the largest logit'.replace('e-0', 'e-') in text
