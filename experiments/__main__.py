"""``python -m experiments list | run NAME|all [--quick] [--seeds N] | table``.

Sets 8 host CPU devices before JAX starts (experiment 5 needs them; the
others run on one).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import time

import jax

jax.config.update('jax_num_cpu_devices', 8)

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


def report(name, path, summary, seconds, quick):
  """Prints the config, each arm's final accuracy, the time and the files."""
  config = json.loads(pathlib.Path(path).read_text())['config']
  kind = 'quick' if quick else 'full'
  print(f'== {name} ({kind} run, {seconds:.0f} s)')
  print('config: ' + ', '.join(f'{k}={v}' for k, v in config.items()))
  final = {
    k[len('test_acc_final[') : -1]: v
    for k, v in summary.items()
    if k.startswith('test_acc_final[')
  }
  if final:
    width = max(map(len, final))
    print(f'{"arm":{width}}  final test accuracy (mean ± std over seeds)')
    for arm, v in final.items():
      print(f'{arm:{width}}  {v}')
  png = pathlib.Path(path).with_suffix('.png')
  print(f'files: {path}' + (f', {png}' if png.exists() else ''))
  if quick:
    print(
      'This quick run is a smoke check with fewer steps: its numbers and '
      'holds_* verdicts differ from the full run, whose results are in '
      'experiments/README.md.'
    )
  print('summary: ' + json.dumps(summary, indent=1, ensure_ascii=False))


if __name__ == '__main__':
  main()
