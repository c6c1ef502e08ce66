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


def test_readme_lists_exactly_the_deliberate_differences():
  """Each skip in tests/peer/ has one README bullet, and nothing more."""
  from tests.peer.conftest import DIFFERENCES
  text = README.read_text()
  section = re.search(r'<!-- differences:start -->\n(.*?)<!-- differences:end',
                      text, re.S).group(1)
  bullets = re.findall(r'^- \*\*(.+?)\.\*\*', section, re.M)
  assert sorted(bullets) == sorted(t for t, _ in DIFFERENCES.values())


def test_readme_fold_figures_are_the_committed_measurement():
  import json
  rows = json.loads((README.parent / 'benchmarks' / 'results' /
                     'fold.json').read_text())['rows']
  text = ' '.join(README.read_text().split())
  for row in rows:
    assert f"{row['speedup']:.2f}x" in text, row
  rel = max(r['max_rel_logit_diff'] for r in rows)
  assert f'within {rel:.1e} of the largest logit'.replace('e-0', 'e-') in text
