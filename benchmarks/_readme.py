"""The generated blocks of the READMEs: each benchmark module owns its own.

A block is the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
in one of ``FILES``; a module's ``readme_blocks()`` returns ``{NAME: text}``
computed from ``benchmarks/results/*.json`` (every run kept, with its date,
commit and ``dirty`` flag, so a range quoted across runs is computed from the
records, never typed). ``python -m benchmarks report`` rewrites them all and
measures nothing; ``tests/docs/test_readme.py`` checks that the committed
blocks equal what the modules generate.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = (
  ROOT / 'benchmarks' / 'README.md',
  ROOT / 'docs' / 'guides' / 'numerics.md',
)


def commit(env: dict) -> str:
  """The commit a run measured, and whether the tree was dirty."""
  dirty = {True: ' (dirty)', False: '', None: ' (dirty: not recorded)'}
  return f'{env.get("commit") or "?"}{dirty[env.get("dirty")]}'


def span(values, fmt='{:.2f}') -> str:
  """'lo to hi' of the values that are not None ('lo' if they agree)."""
  values = [v for v in values if v is not None]
  if not values:
    return 'n/a'
  lo, hi = min(values), max(values)
  return (
    fmt.format(lo)
    if fmt.format(lo) == fmt.format(hi)
    else (f'{fmt.format(lo)} to {fmt.format(hi)}')
  )


def block_pattern(name: str) -> str:
  return f'(<!-- {name}:start -->\n)(.*?)(\n?<!-- {name}:end -->)'


def find(name: str) -> tuple[pathlib.Path, str]:
  """(file, current text) of the one block called name."""
  hits = [
    (p, m.group(2))
    for p in FILES
    for m in re.finditer(block_pattern(name), p.read_text(), re.S)
  ]
  if len(hits) != 1:
    raise ValueError(
      f'{name}: {len(hits)} blocks of that name in {FILES}; '
      'there must be one pair of markers'
    )
  return hits[0]


def fill(blocks: dict[str, str]) -> list[pathlib.Path]:
  """Rewrites each named block with its text; returns the files changed."""
  changed = []
  for name, body in blocks.items():
    path, _ = find(name)
    text = path.read_text()
    new = re.sub(
      block_pattern(name),
      lambda m, body=body: m.group(1) + body + '\n' + m.group(3).lstrip('\n'),
      text,
      flags=re.S,
    )
    if new != text:
      path.write_text(new)
      changed.append(path)
  return changed
