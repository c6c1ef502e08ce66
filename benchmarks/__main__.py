"""``python -m benchmarks list | run NAME [ARGS...] | report``.

``list`` names every benchmark and its question; ``run NAME`` measures
(``--smoke`` for a seconds-long check that records nothing) and rewrites the
README blocks the benchmark owns; ``report`` rewrites every block from the
committed ``results/*.json`` and measures nothing. Each benchmark re-executes
itself with the allocator setting of ``_timing.MALLOC`` (timings on this
machine swing by up to 1.7x without it).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmarks import _readme

# The modules of benchmarks/, one per question: each has main(argv), and
# readme_blocks() where it owns README blocks.
BENCHMARKS = (
  'layer',
  'torch_layer',
  'reductions',
  'numerics',
  'sync',
  'sync_lowering',
  'sync_model',
  'model',
  'compile',
  'sync_compile',
  'fold',
  'device',
  'inplace_abn',
)


def load(name: str):
  return importlib.import_module(f'benchmarks.{name}')


def blocks() -> dict[str, str]:
  """Every generated README block, by marker name, from every benchmark."""
  out: dict[str, str] = {}
  for name in BENCHMARKS:
    module = load(name)
    if hasattr(module, 'readme_blocks'):
      out.update(module.readme_blocks())
  return out


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(prog='python -m benchmarks')
  sub = p.add_subparsers(dest='cmd', required=True)
  sub.add_parser('list')
  r = sub.add_parser('run', help='run one benchmark (ARGS go to it)')
  r.add_argument('name', choices=list(BENCHMARKS))
  sub.add_parser(
    'report',
    help='rewrite every README block from results/*.json (measures nothing)',
  )
  a, rest = p.parse_known_args(argv)
  if rest and a.cmd != 'run':
    p.error(f'unrecognized arguments: {" ".join(rest)}')
  if a.cmd == 'list':
    for name in BENCHMARKS:
      doc = (load(name).__doc__ or '').strip().splitlines()[0]
      print(f'{name:14s} {doc}')
  elif a.cmd == 'report':
    for path in _readme.fill(blocks()):
      print(f'filled {path.relative_to(_readme.ROOT)}')
  else:
    module = load(a.name)
    out = module.main(rest)
    if '--smoke' not in rest and hasattr(module, 'readme_blocks'):
      for path in _readme.fill(module.readme_blocks()):
        print(f'filled {path.relative_to(_readme.ROOT)}')
    return out
  return None


if __name__ == '__main__':
  main()
