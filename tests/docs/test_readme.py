"""The READMEs: their Python examples run as written, and every generated
block or quoted figure (benchmark tables, the experiments claims table, the
versions table in the contributing guide, speed ranges, the experiments'
figures) is what the committed results give."""

import json
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / 'README.md'
CONTRIBUTING = README.parent / 'docs' / 'guides' / 'contributing.md'


def test_readme_python_blocks_run():
  """Each block on its own, as a reader pastes one."""
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  assert len(blocks) >= 3
  for block in blocks:
    exec(compile(block, str(README), 'exec'), {})


def test_readme_first_screen_is_what_why_install_and_the_swap():
  """The first sections a reader meets: what it is and when it changes
  results (the intro), the install with every extra, then the swap for
  linen, nnx and Equinox."""
  text = README.read_text()
  heads = re.findall(r'^## (.+)$', text, re.M)
  assert heads[:3] == ['Install', 'The one-line swap', 'A training loop'], heads
  intro = text[: text.index('## Install')]
  for case in (
    'far from zero',
    'uneven data-parallel',
    'accumulation',
    'Short runs',
  ):
    assert case in intro, case
  install = text[text.index('## Install') : text.index('## The one-line')]
  project = __import__('tomllib').loads(
    (README.parent / 'pyproject.toml').read_text()
  )['project']
  for extra in project['optional-dependencies']:
    assert f'pip install -e ".[{extra}]"' in install, extra
  swap = text[text.index('## The one-line') : text.index('## A training')]
  for cls in (
    'bnjax.linen.BatchNorm',
    'bnjax.nnx.BatchNorm',
    'bnjax.equinox.BatchNorm',
  ):
    assert cls in swap, cls


def test_readme_numerics_figures_are_the_committed_measurement():
  """The exactness row quotes benchmarks/results/numerics.json: bnjax's
  worst error over every function, layout and path, and flax's default at
  |mean|/std 1e4 on one device (the table itself is in
  docs/guides/numerics.md, checked by tests/docs/test_docs.py)."""
  from benchmarks import _timing

  rows = _timing.latest('numerics')['rows']
  text = README.read_text()
  worst = max(r['rel_err'] for r in rows if r['impl'] == 'bnjax')
  assert worst <= 1e-5
  assert f'(worst {worst:.1e})'.replace('e-0', 'e-') in text
  flax = [
    r['rel_err']
    for r in rows
    if r['impl'] == 'flax'
    and r['ratio'] == 1e4
    and r['synced'] is False
    and r['layout'] == 'identical'
    and r['fn'] == 'fast_variance=True'
    and r.get('shape', '2-D') == '2-D'
  ]
  assert len(flax) == 1, flax
  assert f'off by a factor of {flax[0]:.0f} at 1e4' in text


def test_readme_links_resolve():
  """Every relative link of the README points at a file of the checkout."""
  for target in re.findall(r'\]\(([^)#:]+)(?:#[^)]*)?\)', README.read_text()):
    assert (README.parent / target).exists(), target


def _commands(path):
  return re.findall(
    r'```(?:text)?\n(pip install -e "[^\n]*)\n```', path.read_text()
  )


def test_ci_runs_the_readme_commands():
  """The README's two commands, the demo and the test command, and the
  contributing guide's docs command run in CI as written: `.ci/run` runs
  the test and docs commands, `.ci/extras` (which `.ci/run` calls) the demo
  in a fresh venv."""
  ci = (README.parent / '.ci' / 'run').read_text()
  extras = (README.parent / '.ci' / 'extras').read_text()
  assert re.search(r'^bash \.ci/extras$', ci, re.M)
  readme = _commands(README)
  assert [c.split('"')[1] for c in readme] == [
    '.[experiments]',
    '.[test,torch]',
  ]
  demo, test = readme
  assert demo.replace('pip install', 'python -m pip install -q') in extras
  assert test.replace('pip install', 'python -m pip install -q') in ci
  (docs,) = [c for c in _commands(CONTRIBUTING) if '[docs]' in c]
  assert docs.replace('pip install', 'python -m pip install -q') in ci
  assert test in CONTRIBUTING.read_text()


GENERATED = re.compile(r'<!-- ([\w-]+):start -->.*?<!-- \1:end -->', re.S)
FIGURE = re.compile(
  r'(?<![\w.])(?:\d+\.\d+(?:e[+-]?\d+)?|\d+e[+-]\d+)'
  r'(?![\w.]*\d)'
)
# Figures that may stand in prose: versions, settings and targets, not
# measurements. Every measured figure lives in a generated block or is
# checked against the committed results by a test of its own.
NOT_MEASURED = {
  'README.md': {
    '3.11': 'Python version',
    '3.13': 'Python version',
    '0.11': 'a JAX version',
    '0.99': "flax's default momentum",
    '0.9': 'a lower momentum, a setting',
    '0.37': '0.99**100, arithmetic (test_readme_short_run_figures...)',
    '1e-5': 'the old exactness bar',
    '1e-6': 'the exactness bar',
    '1e-4': 'a test tolerance',
  },
  'benchmarks/README.md': {
    '0.9': "the PyTorch goal's fraction",
    '1e4': 'a |mean|/std ratio',
    '1e2': 'ratio',
    '1e6': 'ratio',
    '1e-5': 'the old exactness bar',
    '1e-6': 'the exactness bar',
    '0.1': 'a layout setting: means 0.1% apart',
  },
  'docs/index.md': {
    '3.11': 'Python version',
    '3.13': 'Python version',
    '1e-5': 'the old exactness bar',
    '1e-6': 'the exactness bar',
  },
}


def prose_figures(path):
  text = GENERATED.sub('', (README.parent / path).read_text())
  text = re.sub(r'```.*?```', '', text, flags=re.S)
  text = re.sub(r'`[^`\n]*`', '', text)
  return FIGURE.findall(text)


def test_benchmarks_readme_blocks_are_generated_from_the_committed_runs():
  from benchmarks import _readme
  from benchmarks.__main__ import blocks

  for name, body in blocks().items():
    path, text = _readme.find(name)  # exactly one block of each name
    assert text == body, (
      f'the {name} block of {path.name} is stale: run python -m benchmarks '
      'report'
    )


def _step_ranges():
  """The layer benchmark's train-step ratio over its two latest runs: the
  range at the three 4-D shapes, and at the two 2-D shapes."""
  from benchmarks import _timing, layer

  lo, hi = layer.layer_range('step', last=2)
  two_d = [
    r['ratio']
    for run in _timing.runs('layer')[-2:]
    for r in run['rows']
    if r['mode'] == 'step' and len(r['shape']) == 2 and r.get('ratio')
  ]
  assert len(two_d) == 4, two_d
  return (lo, hi), (min(two_d), max(two_d))


def test_speed_figures_quoted_in_prose_are_computed_from_the_runs():
  """The README's and the docs' "train step X to Yx ... at the three 4-D
  shapes and X to Yx at the two 2-D shapes" is the range of the layer
  benchmark's step ratio over its two latest runs (regression: the README
  gave the 4-D range as the step's, while a 2-D shape ran at 1.09x)."""
  (lo, hi), (lo2, hi2) = _step_ranges()
  shapes = (
    f'time at the three 4-D shapes and {lo2:.2f} to {hi2:.2f}x at the two '
    '2-D shapes'
  )
  for path, whose in (
    ('README.md', "`flax.linen.BatchNorm`'s"),
    ('docs/index.md', "flax's"),
  ):
    text = ' '.join((README.parent / path).read_text().split())
    assert f'train step {lo:.2f} to {hi:.2f}x {whose} {shapes}' in text, path


def _experiment_figures():
  """The figures the README quotes from the experiments' full runs."""
  results = README.parent / 'experiments' / 'results'
  e9 = json.loads((results / 'exact_stats.json').read_text())['summary']
  e6 = json.loads((results / 'running_stats.json').read_text())['runs']
  return dict(
    uneven=100 * e9['synced_var_error[flax]']['uneven_max'],
    flax_nan_runs=e9['nan_runs[flax]'],
    bnjax_nan_runs=e9['nan_runs[bnjax]'],
    ema=(min(e6['ema_acc']), max(e6['ema_acc'])),
    precise=(min(e6['precise_acc']), max(e6['precise_acc'])),
  )


def test_readme_experiment_figures_are_the_committed_results():
  """Experiment 9's synced-variance error and NaN runs, and experiment 6's
  short-run accuracies (the running statistics against recomputed ones, in
  the README and the getting-started guide), as experiments/results/*.json
  give them."""
  f = _experiment_figures()
  text = ' '.join(README.read_text().split())
  assert f'off by up to {f["uneven"]:.1f}%' in text
  assert f['flax_nan_runs'] == 3 and f['bnjax_nan_runs'] == 0
  assert 'all 3 flax runs ended with NaN parameters; no bnjax run did' in text
  assert f'{0.99**100:.2f} after 100 steps' in text
  (a, b), (c, d) = f['ema'], f['precise']
  guide = README.parent / 'docs' / 'guides' / 'getting_started.md'
  for page in (text, ' '.join(guide.read_text().split())):
    assert f'test accuracies of {a:.2f} to {b:.2f} over 3 seeds' in page
    short = f'{c:.2f} to {d:.2f} (`experiments/results/running_stats.json`)'
    assert short in page


def test_no_unrecorded_figure_in_readme_prose():
  """A number in the READMEs' prose is a setting or a target (listed above),
  a figure a test computes from results/*.json (the speed ranges, the worst
  error, the experiments' figures), or it sits in a generated block."""
  from benchmarks import _timing

  (lo, hi), (lo2, hi2) = _step_ranges()
  worst = max(
    r['rel_err']
    for r in _timing.latest('numerics')['rows']
    if r['impl'] == 'bnjax'
  )
  f = _experiment_figures()
  checked = {f'{v:.2f}' for v in (lo, hi, lo2, hi2, *f['ema'], *f['precise'])}
  checked |= {f'{worst:.1e}'.replace('e-0', 'e-'), f'{f["uneven"]:.1f}'}
  checked |= set(_sync_compile_figures())
  for path, allowed in NOT_MEASURED.items():
    stray = set(prose_figures(path)) - set(allowed) - checked
    assert not stray, (path, sorted(stray))


def _sync_compile_figures() -> list[str]:
  """The latest synced compile run's ratios (compile, then step; pmap,
  then shard_map), as the README's Speed row states them."""
  from benchmarks import _timing

  rows = {r['mapping']: r for r in _timing.latest('sync_compile')['rows']}
  return [
    f'{rows[m][k]:.2f}'
    for k in ('ratio', 'step_ratio')
    for m in ('pmap', 'shard_map')
  ]


def test_readme_states_the_latest_synced_compile_run():
  c_pmap, c_smap, s_pmap, s_smap = _sync_compile_figures()
  want = (
    f'a synced ResNet-18 on 8 CPU devices in {c_pmap}x (pmap) and {c_smap}x '
    f"(shard_map) of flax's, its step in {s_pmap}x and {s_smap}x"
  )
  assert want in README.read_text()


def _pin(path, name, python):
  """The version .ci/<path> pins for ``name`` on ``python`` (X.Y)."""
  for line in (README.parent / '.ci' / path).read_text().splitlines():
    line = line.split('#')[0].strip()
    m = re.match(
      rf'{name}==([\w.]+)(?:;\s*python_version\s*([<>=]+)\s*'
      r'"([\d.]+)")?$',
      line,
    )
    if m:
      op, bound = m.group(2), m.group(3)
      key = tuple(map(int, python.split('.')))
      if op is None or eval(f'{key} {op} {tuple(map(int, bound.split(".")))}'):
        return m.group(1)
  raise AssertionError(f'.ci/{path} pins no {name} for Python {python}')


def _job_python(script):
  return re.search(
    r'find-python (3\.\d+)', (README.parent / '.ci' / script).read_text()
  ).group(1)


def versions_table():
  """The README's matrix, from the pin files and the jobs' scripts."""
  readme_py = '3.11'  # .ci/run's own interpreter: the image's default
  newest, floor = _job_python('newest'), _job_python('floor')
  rows = [
    (
      "the README's test command",
      readme_py,
      'newest.txt',
      'the whole suite, with the PyTorch oracle',
    ),
    (
      'newest (`bash .ci/newest`)',
      newest,
      'newest.txt',
      f'the whole suite (tests/peer: flax {_pin("newest.txt", "flax", newest)}'
      "'s own tests)",
    ),
    (
      'floor (`bash .ci/floor`)',
      floor,
      'floor.txt',
      'tests/core, tests/modules, tests/interop against the built wheel; '
      'tests/core again on the GPU/TPU statistics path',
    ),
  ]
  lines = [
    '| job | Python | jax, jaxlib | flax | what runs |',
    '|---|---|---|---|---|',
  ]
  for job, py, pins, what in rows:
    jax_v, jaxlib_v = _pin(pins, 'jax', py), _pin(pins, 'jaxlib', py)
    assert jax_v == jaxlib_v, (pins, py)
    lines.append(
      f'| {job} | {py} | {jax_v} | {_pin(pins, "flax", py)} | {what} |'
    )
  return '\n'.join(lines)


def test_versions_matrix_is_the_pinned_one():
  """The contributing guide states the CI matrix of .ci/newest.txt,
  .ci/floor.txt and the Pythons .ci/newest and .ci/floor find; the README's
  own job runs on the interpreter .ci/run starts with (3.11 here)."""
  want = versions_table()
  for path in (CONTRIBUTING,):
    block = re.search(
      r'<!-- versions:start -->\n(.*?)\n<!-- versions:end -->',
      path.read_text(),
      re.S,
    ).group(1)
    assert block == want, (
      f'{path.name}: replace the versions block with\n{want}'
    )
  pyproject = (README.parent / 'pyproject.toml').read_text()
  assert 'requires-python = ">=3.11"' in pyproject


def test_experiments_claims_table_is_generated_from_the_committed_results():
  """The table's rows, "our result" and "holds?" come from each module's
  CLAIMS and results/NAME.json (the criterion the run computed), and every
  experiment has at least one claim with a boolean criterion."""
  pytest.importorskip('optax')
  from experiments import __main__ as cli
  from experiments._common import claims

  modules = {n: cli.load(n) for n in cli.EXPERIMENTS}
  assert all(m.CLAIMS for m in modules.values())
  assert claims.written() == claims.table(modules), (
    'stale: run python -m experiments table'
  )
