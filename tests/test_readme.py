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
