"""Keeps the experiments working: every quick config runs (results to a tmp dir)."""

import json
import os
import subprocess
import sys
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_all_quick_configs_run(tmp_path):
  pytest.importorskip('mnist1d')
  pytest.importorskip('mlxtend')
  env = dict(os.environ, BNJAX_RESULTS=str(tmp_path), TQDM_DISABLE='1')
  r = subprocess.run([sys.executable, '-m', 'experiments', 'run', 'all',
                      '--quick', '--seeds', '2'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  files = sorted(p.name for p in tmp_path.glob('*_quick.json'))
  assert len(files) == 8, files
  for f in files:
    out = json.loads((tmp_path / f).read_text())
    assert out['seeds'] == [0, 1] and out['jax'] and out['summary']
    assert (tmp_path / f.replace('.json', '.png')).exists()


def test_list():
  r = subprocess.run([sys.executable, '-m', 'experiments', 'list'], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and 'with_without' in r.stdout
