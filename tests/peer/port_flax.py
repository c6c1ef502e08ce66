"""Regenerates tests/peer/flax_<version>/test_flax_*.py from a Flax source tree.

Usage: python tests/peer/port_flax.py FLAX_SRC (an unpacked flax sdist,
``pip download flax==X --no-binary :all: --no-deps``). The ports here came
from flax 0.12.8 and 0.12.12; tests/peer/conftest.py runs the one of the
newest release not newer than the installed flax.

Each generated file is one of Flax's test files, reduced to the test methods
that use BatchNorm (plus the module's imports, helpers and the test classes'
non-test methods), with exactly one textual change: Flax's BatchNorm class is
replaced by bnjax's (``nn.BatchNorm`` -> ``bnjax.linen.BatchNorm`` in linen
tests, ``nnx.BatchNorm`` -> ``bnjax.nnx.BatchNorm`` in nnx tests; a
``linen.BatchNorm`` inside an nnx test stays Flax's, so the nnx/linen
equivalence test compares bnjax against Flax). Assertions are unchanged.
Cases that fail by design are skipped in tests/peer/conftest.py, with the
reason, and listed in the README.
"""

import ast
import pathlib
import re
import sys

FILES = {
  'linen/linen_test.py': 'linen',
  'linen/linen_module_test.py': 'linen',
  'linen/linen_transforms_test.py': 'linen',
  'linen/summary_test.py': 'linen',
  'nnx/nn/normalization_test.py': 'nnx',
  'nnx/bridge/wrappers_test.py': 'nnx',
  'nnx/graph_utils_test.py': 'nnx',
  'nnx/helpers_test.py': 'nnx',
  'nnx/integration_test.py': 'nnx',
  'nnx/module_test.py': 'nnx',
  'nnx/summary_test.py': 'nnx',
  'nnx/transforms_test.py': 'nnx',
}
SWAP = {
  'linen': (r'\bnn\.BatchNorm\b', 'bnjax.linen.BatchNorm'),
  'nnx': (r'(?<![\w.])nnx\.BatchNorm\b', 'bnjax.nnx.BatchNorm'),
}
HEADER = """\
# Ported from flax {version} tests/{rel} by tests/peer/port_flax.py: only the
# test methods that use BatchNorm, with Flax's BatchNorm swapped for bnjax's.
# Do not edit by hand; regenerate. Original copyright notice follows.
"""


def _is_testcase(node: ast.ClassDef) -> bool:
  return any(ast.unparse(b).endswith('TestCase') for b in node.bases)


def _keep(src: str, node: ast.stmt) -> bool:
  if isinstance(node, ast.If) and 'main' in ast.unparse(node.test):
    return False
  return True


def port(root: pathlib.Path, rel: str, kind: str) -> tuple[str, int]:
  src = (root / 'tests' / rel).read_text()
  lines = src.splitlines(keepends=True)
  tree = ast.parse(src)
  drop: list[tuple[int, int]] = []  # 1-based inclusive line ranges
  kept_tests = 0
  for node in tree.body:
    if not _keep(src, node):
      drop.append((node.lineno, node.end_lineno))
      continue
    if not (isinstance(node, ast.ClassDef) and _is_testcase(node)):
      continue
    tests = [
      f
      for f in node.body
      if isinstance(f, ast.FunctionDef) and f.name.startswith('test')
    ]
    keep = [f for f in tests if 'BatchNorm' in ast.get_source_segment(src, f)]
    if not keep:
      start = min([node.lineno] + [d.lineno for d in node.decorator_list])
      drop.append((start, node.end_lineno))
      continue
    kept_tests += len(keep)
    for f in tests:
      if f not in keep:
        start = min([f.lineno] + [d.lineno for d in f.decorator_list])
        drop.append((start, f.end_lineno))
  for a, b in drop:
    for i in range(a - 1, b):
      lines[i] = None
  body = ''.join(line for line in lines if line is not None)
  pattern, repl = SWAP[kind]
  body = re.sub(pattern, repl, body)
  imports = 'import bnjax.linen\n' if kind == 'linen' else 'import bnjax.nnx\n'
  # after the license header (the first non-comment line)
  m = re.search(r'^(?!#)', body, flags=re.M)
  body = body[: m.start()] + imports + body[m.start() :]
  version = re.search(
    r"__version__ = ['\"](.*)['\"]", (root / 'flax/version.py').read_text()
  )[1]
  return HEADER.format(version=version, rel=rel) + body, kept_tests


def main(root: str) -> None:
  root_path = pathlib.Path(root)
  version = re.search(
    r"__version__ = ['\"](.*)['\"]",
    (root_path / 'flax/version.py').read_text(),
  )[1]
  out = pathlib.Path(__file__).parent / ('flax_' + version.replace('.', '_'))
  out.mkdir(exist_ok=True)
  (out / '__init__.py').touch()
  for rel, kind in FILES.items():
    text, n = port(root_path, rel, kind)
    name = 'test_flax_' + rel.replace('/', '_').replace('_test.py', '.py')
    (out / name).write_text(text)
    print(f'{name}: {n} test methods')


if __name__ == '__main__':
  main(sys.argv[1])
