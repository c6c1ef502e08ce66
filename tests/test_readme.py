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
