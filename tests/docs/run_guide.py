"""Runs a guide's ```python blocks in order, in one namespace, as a reader
would paste them: ``python tests/docs/run_guide.py PATH [--section TITLE]``.

Blocks fenced as ```text are sketches that cannot run (a multi-host launch)
and are not run. ``--section`` runs only the blocks under the ``## TITLE...``
heading (the Equinox and Haiku guide's two halves need one extra each).

The device count is JAX's: 1 on a plain CPU, 8 with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. tests/docs/test_docs.py
runs every guide both ways; .ci/extras runs guides from a fresh venv that holds
the built wheel and one extra. Run as a script from any directory, so that
``import bnjax`` finds the installed package rather than a checkout."""

import argparse
import pathlib
import re


def python_blocks(path, section=None):
  text = pathlib.Path(path).read_text()
  if section is not None:
    parts = re.split(r'^(?=## )', text, flags=re.M)
    chosen = [p for p in parts if p.startswith(f'## {section}')]
    if len(chosen) != 1:
      raise ValueError(
        f'{path}: {len(chosen)} sections start with "## {section}"; want 1'
      )
    text = chosen[0]
  return re.findall(r'^```python\n(.*?)^```', text, re.S | re.M)


def run(path, section=None, namespace=None):
  """Runs the blocks; returns the namespace they ran in."""
  blocks = python_blocks(path, section)
  if not blocks:
    raise ValueError(f'{path} has no ```python block to run')
  namespace = {'__name__': 'guide'} if namespace is None else namespace
  for block in blocks:
    exec(compile(block, str(path), 'exec'), namespace)
  return namespace


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('path')
  parser.add_argument('--section', default=None)
  args = parser.parse_args()
  import jax

  import bnjax

  run(args.path, args.section)
  where = f' (section {args.section!r})' if args.section else ''
  print(
    f'{args.path}{where}: ran on {jax.device_count()} device(s), bnjax '
    f'{bnjax.__version__} from {pathlib.Path(bnjax.__file__).parent}'
  )


if __name__ == '__main__':
  main()
