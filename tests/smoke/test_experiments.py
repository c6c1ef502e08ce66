"""Keeps the experiments working: every quick config runs (results to a tmp dir)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.heavy(130)  # CPU-seconds on 2 cores
def test_all_quick_configs_run(tmp_path):
  pytest.importorskip('mnist1d')
  pytest.importorskip('mlxtend')
  env = dict(os.environ, BNJAX_RESULTS=str(tmp_path), TQDM_DISABLE='1')
  # No wall-clock timeout: the work is bounded (each quick config runs a
  # fixed number of steps), and a fixed limit turned a loaded machine into
  # a failure (the run took 294 s alone and hit 900 s under load).
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments',
      'run',
      'all',
      '--quick',
      '--seeds',
      '2',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  # Every quick run prints the same table, and what the full run showed
  # (regression: exact_stats printed its summary as raw JSON, and its quick
  # arms all sit near chance with nothing to say what the full run shows).
  assert r.stdout.count('\nquantity ') == 9, r.stdout[-3000:]
  assert r.stdout.count('holds_* verdicts differ from the full run') == 9
  assert '{' not in r.stdout.split('== exact_stats')[1], r.stdout[-3000:]
  files = sorted(p.name for p in tmp_path.glob('*_quick.json'))
  assert len(files) == 9, files
  for f in files:
    out = json.loads((tmp_path / f).read_text())
    assert out['seeds'] == [0, 1] and out['jax'] and out['summary']
    assert (tmp_path / f.replace('.json', '.png')).exists()


def test_list():
  r = subprocess.run(
    [sys.executable, '-m', 'experiments', 'list'],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 0 and 'with_without' in r.stdout


def test_figures_must_show_every_arm():
  """Regression: experiment 1's panel (a) fixed ylim at 0.5 to 1.0 and hid
  the whole no-BN curve (0.11 to 0.445). Every figure is checked on save
  (so the quick run above checks all nine); a hidden curve or bar raises."""
  pytest.importorskip('matplotlib')
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from experiments._common import results

  fig, ax = plt.subplots()
  ax.plot([0, 1], [0.11, 0.445], label='no BN')
  results.check_axes_hold_data(fig)  # autoscaled: fine
  ax.set_ylim(0.5, 1.0)
  with pytest.raises(ValueError, match="'no BN'.*outside its limits"):
    results.check_axes_hold_data(fig)
  fig2, ax2 = plt.subplots()
  ax2.bar(['BN'], [0.25])
  ax2.set_ylim(0.3, 1.0)
  with pytest.raises(ValueError, match='outside its limits'):
    results.check_axes_hold_data(fig2)
  plt.close('all')


def test_every_module_states_claim_setup_and_criterion():
  import ast

  for path in sorted((ROOT / 'experiments').glob('e*_*.py')):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    for label in ('Claim', 'Source', 'Setup', 'Criterion', 'Command', 'Time'):
      assert f'\n{label}' in doc, (path.name, label)
