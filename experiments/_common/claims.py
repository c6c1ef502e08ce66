"""The experiments table, generated from the committed full-run results.

Each experiment module declares ``CLAIMS``: what it tests, the source, the
summary key of the criterion its run computed (set in the module before the
full run), and how to state its result from the summary. ``table()`` builds
the README table from those and ``results/NAME.json``, so the "holds?"
column is the run's own boolean, never typed by hand.
``python -m experiments table`` writes it into experiments/README.md;
``tests/smoke/test_experiments.py`` checks that the two agree.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'


@dataclasses.dataclass(frozen=True)
class Claim:
  """One row of the table.

  Attributes:
    text: the claim as tested.
    source: the paper and figure or section.
    holds: the key of the boolean criterion in the run's summary.
    result: states our result from the summary (mean ± std over seeds).
  """

  text: str
  source: str
  holds: str
  result: Callable[[dict], str]


def mean(value) -> str:
  """'0.9173 ± 0.0019 (n=3)' -> '0.917 ± 0.002'; a float -> 3 digits."""
  if isinstance(value, str):
    m = re.match(r'(-?[\d.]+) ± ([\d.]+)', value)
    if m:
      return f'{float(m.group(1)):.3f} ± {float(m.group(2)):.3f}'
    return value
  if value is None:
    return 'undefined'
  if isinstance(value, int):
    return str(value)
  return f'{value:.3g}'


def points(value) -> str:
  """An error rate '0.0930 ± 0.0071 (n=3)' as percent: '9.3 ± 0.7%'."""
  m = re.match(r'(-?[\d.]+) ± ([\d.]+)', value)
  return f'{100 * float(m.group(1)):.1f} ± {100 * float(m.group(2)):.1f}%'


def load(name: str) -> dict:
  return json.loads((ROOT / 'results' / f'{name}.json').read_text())


def rows(experiments: dict) -> list[str]:
  """Table rows for ``{name: module}`` in order, from each full run."""
  out = []
  for number, (name, module) in enumerate(experiments.items(), start=1):
    result = load(name)
    if result['quick']:
      raise ValueError(f'results/{name}.json is a quick run')
    summary = result['summary']
    for claim in module.CLAIMS:
      holds = summary.get(claim.holds)
      if not isinstance(holds, bool):
        raise KeyError(
          f'results/{name}.json has no boolean {claim.holds!r}: '
          f'rerun python -m experiments run {name}'
        )
      out.append(
        f'| {number} | {claim.text} | {claim.source} | '
        f'{claim.result(summary)} (n = {len(result["seeds"])}) | '
        f'{"yes" if holds else "no"} (`{claim.holds}`) | '
        f'[{name}.png](results/{name}.png) |'
      )
  return out


def table(experiments: dict) -> str:
  return '\n'.join(
    [
      '| # | claim | source | our result (mean ± std over seeds) | holds? '
      '(computed) | figure |',
      '|---|---|---|---|---|---|',
      *rows(experiments),
    ]
  )


PATTERN = re.compile(
  r'(<!-- claims:start -->\n)(.*?)\n?(<!-- claims:end -->)', re.S
)


def written() -> str:
  m = PATTERN.search(README.read_text())
  if not m:
    raise ValueError('experiments/README.md has no claims markers')
  return m.group(2)


def fill(experiments: dict) -> pathlib.Path:
  body = table(experiments)
  README.write_text(
    PATTERN.sub(
      lambda m: m.group(1) + body + '\n' + m.group(3), README.read_text()
    )
  )
  return README
