"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_python_blocks_run():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  assert len(blocks) >= 3
  for block in blocks:
    if 'jax.distributed.initialize()' in block:
      continue  # needs a real multi-host launch: see tests/test_multihost.py
    exec(compile(block, str(README), 'exec'), {})


def test_readme_numerics_figures_are_the_committed_measurement():
  """The exactness row quotes benchmarks/results/numerics.json: bnjax's
  worst error over every function, layout and path, and flax's default at
  |mean|/std 1e4 on one device (the table itself is in
  docs/guides/numerics.md, checked by tests/test_docs.py)."""
  from benchmarks import _timing
  rows = _timing.latest('numerics')['rows']
  text = README.read_text()
  worst = max(r['rel_err'] for r in rows if r['impl'] == 'bnjax')
  assert worst <= 1e-5
  assert f'(worst {worst:.1e})'.replace('e-0', 'e-') in text
  flax = [r['rel_err'] for r in rows
          if r['impl'] == 'flax' and r['ratio'] == 1e4 and r['synced'] is False
          and r['layout'] == 'identical' and r['fn'] == 'fast_variance=True']
  assert len(flax) == 1, flax
  assert f'off by a factor of {flax[0]:.0f} at 1e4' in text


def test_readme_links_resolve():
  """Every relative link of the README points at a file of the checkout."""
  for target in re.findall(r'\]\(([^)#:]+)(?:#[^)]*)?\)', README.read_text()):
    assert (README.parent / target).exists(), target


def test_ci_runs_the_readme_commands():
  """`.ci/run` runs the README's test command and its docs command as
  written, so what a reader runs is what CI checks."""
  ci = (README.parent / '.ci' / 'run').read_text()
  commands = re.findall(r'```\n(pip install -e "\.\[(?:test|docs)[^\n]*)\n```',
                        README.read_text())
  assert len(commands) == 2, commands
  for command in commands:
    assert command.replace('pip install', 'python -m pip install -q') in ci, (
      command)


GENERATED = re.compile(r'<!-- ([\w-]+):start -->.*?<!-- \1:end -->', re.S)
FIGURE = re.compile(r'(?<![\w.])(?:\d+\.\d+(?:e[+-]?\d+)?|\d+e[+-]\d+)'
                    r'(?![\w.]*\d)')
# Figures that may stand in prose: versions, settings and targets, not
# measurements. Every measured figure lives in a generated block or is
# checked against the committed results by a test of its own.
NOT_MEASURED = {
  'README.md': {'3.11': 'Python version', '0.99': "flax's default momentum",
                '1e-5': 'the old exactness bar', '1e-6': 'the exactness bar',
                '1e-4': 'a test tolerance'},
  'benchmarks/README.md': {'0.9': "the PyTorch goal's fraction",
                           '1e4': 'a |mean|/std ratio', '1e2': 'ratio',
                           '1e6': 'ratio', '1e-5': 'the old exactness bar',
                           '1e-6': 'the exactness bar',
                           '0.1': 'a layout setting: means 0.1% apart'},
  'docs/index.md': {'3.11': 'Python version', '1e-5': 'the old exactness bar',
                    '1e-6': 'the exactness bar'},
}


def prose_figures(path):
  text = GENERATED.sub('', (README.parent / path).read_text())
  text = re.sub(r'```.*?```', '', text, flags=re.S)
  text = re.sub(r'`[^`\n]*`', '', text)
  return FIGURE.findall(text)


def test_benchmarks_readme_blocks_are_generated_from_the_committed_runs():
  from benchmarks import report
  text = (README.parent / 'benchmarks' / 'README.md').read_text()
  for name, body in report.blocks().items():
    m = re.search(report.block_pattern(name), text, re.S)
    assert m, f'benchmarks/README.md has no {name} block'
    assert m.group(2) == body, (
      f'the {name} block is stale: run python benchmarks/report.py')


def test_speed_figures_quoted_in_prose_are_computed_from_the_runs():
  """The README's and the docs' "train step X to Yx" is the range of the
  layer benchmark's step ratio over its two latest runs."""
  from benchmarks import report
  lo, hi = report.layer_range('step', last=2)
  for path in ('README.md', 'docs/index.md'):
    text = ' '.join((README.parent / path).read_text().split())
    assert f'train step {lo:.2f} to {hi:.2f}x' in text, path


def test_no_unrecorded_figure_in_readme_prose():
  """A number in the READMEs' prose is a setting or a target (listed above),
  a figure a test computes from results/*.json (the speed range, the worst
  error), or it sits in a generated block."""
  from benchmarks import _timing, report
  lo, hi = report.layer_range('step', last=2)
  worst = max(r['rel_err'] for r in _timing.latest('numerics')['rows']
              if r['impl'] == 'bnjax')
  checked = {f'{lo:.2f}', f'{hi:.2f}', f'{worst:.1e}'.replace('e-0', 'e-')}
  for path, allowed in NOT_MEASURED.items():
    stray = set(prose_figures(path)) - set(allowed) - checked
    assert not stray, (path, sorted(stray))
