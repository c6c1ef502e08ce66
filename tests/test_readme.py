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


def test_readme_numerics_table_is_the_committed_measurement():
  """The error table between the numerics markers is generated from
  benchmarks/results/numerics.json, not typed by hand."""
  import json

  from benchmarks import numerics
  text = README.read_text()
  table = re.search(r'<!-- numerics:start -->\n(.*?)\n<!-- numerics:end -->',
                    text, re.S).group(1)
  rows = json.loads((README.parent / 'benchmarks' / 'results' /
                     'numerics.json').read_text())['rows']
  assert table == numerics.table(rows)
  assert max(r['rel_err'] for r in rows if r['impl'] == 'bnjax') <= 1e-5
