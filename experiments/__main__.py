"""``python -m experiments list | run NAME|all [--quick] [--seeds N] | table``.

Sets 8 host CPU devices before JAX starts (experiment 5 needs them; the
others run on one).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import time

import jax

jax.config.update('jax_num_cpu_devices', 8)
# Two XLA:CPU threads a device: with one a device, jax 0.8.1 and 0.10.2 can
# deadlock in experiment 5's all-reduces on a busy machine (tests/conftest.py).
os.environ.setdefault('PJRT_NPROC', '16')

EXPERIMENTS = {
  'with_without': 'e1_with_without',
  'lr_tolerance': 'e2_lr_tolerance',
  'init': 'e3_init',
  'batch_size': 'e4_batch_size',
  'sync': 'e5_sync',
  'running_stats': 'e6_running_stats',
  'landscape': 'e7_landscape',
  'non_iid': 'e8_non_iid',
  'exact_stats': 'e9_exact_stats',
}


def load(name):
  return importlib.import_module(f'experiments.{EXPERIMENTS[name]}')


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m experiments')
  sub = p.add_subparsers(dest='cmd', required=True)
  sub.add_parser('list')
  r = sub.add_parser('run')
  r.add_argument('name', choices=list(EXPERIMENTS) + ['all'])
  r.add_argument('--quick', action='store_true')
  r.add_argument('--seeds', type=int, default=3)
  sub.add_parser(
    'table',
    help="write experiments/README.md's claims table "
    'from results/*.json (runs nothing)',
  )
  a = p.parse_args(argv)
  if a.cmd == 'table':
    from experiments._common import claims

    print(f'filled {claims.fill({n: load(n) for n in EXPERIMENTS})}')
    return
  if a.cmd == 'list':
    for name in EXPERIMENTS:
      doc = (load(name).__doc__ or '').strip().splitlines()[0]
      print(f'{name:15s} {doc}')
    return
  names = list(EXPERIMENTS) if a.name == 'all' else [a.name]
  seeds = list(range(a.seeds))  # fixed in advance: 0, 1, 2, ...
  for name in names:
    t = time.time()
    path, summary = load(name).run(a.quick, seeds)
    report(name, path, summary, time.time() - t, a.quick)


def _cell(value) -> str:
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, float):
    return f'{value:.4g}'
  if value is None:
    return 'undefined'
  if isinstance(value, list):
    return ', '.join(map(_cell, value))
  return str(value)


def summary_rows(summary: dict) -> list[tuple[str, str]]:
  """(quantity, value) for every summary entry, nested dicts flattened."""
  rows = []
  for key, value in summary.items():
    if isinstance(value, dict):
      rows += [(f'{key}.{k}', _cell(v)) for k, v in value.items()]
    else:
      rows.append((key, _cell(value)))
  return rows


def report(name, path, summary, seconds, quick):
  """Prints the config, one table of the run's summary (the same for every
  experiment), the files and, for a quick run, what the full run showed."""
  from experiments._common import claims

  config = json.loads(pathlib.Path(path).read_text())['config']
  kind = 'quick' if quick else 'full'
  print(f'== {name} ({kind} run, {seconds:.0f} s)')
  print('config: ' + ', '.join(f'{k}={v}' for k, v in config.items()))
  rows = summary_rows(summary)
  width = max(len('quantity'), *(len(k) for k, _ in rows))
  print(f'{"quantity":{width}}  value (mean ± std over seeds where n is given)')
  for key, value in rows:
    print(f'{key:{width}}  {value}')
  png = pathlib.Path(path).with_suffix('.png')
  print(f'files: {path}' + (f', {png}' if png.exists() else ''))
  if quick:
    print(
      'This quick run is a smoke check with fewer steps: its numbers and '
      'holds_* verdicts differ from the full run, which showed '
      f'(experiments/results/{name}.json, experiments/README.md):'
    )
    full = claims.load(name)['summary']
    for claim in load(name).CLAIMS:
      verdict = 'yes' if full[claim.holds] else 'no'
      print(f'- {claim.text}: {claim.result(full)} (holds? {verdict})')


if __name__ == '__main__':
  main()
