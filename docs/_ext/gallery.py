"""Sphinx extension: the experiments gallery, generated at every build.

One page per experiment, from what the repository commits and nothing typed
by hand: the module docstring (claim, source, setup, criterion, command,
time), ``experiments/results/NAME.json`` (config, seeds, summary with the
computed ``holds`` flags, jax version, commit) and ``NAME.png``. Pages go to
``docs/gallery/`` (untracked), rewritten only when their text changes so
that incremental builds stay incremental.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / 'experiments'
OUT = ROOT / 'docs' / 'gallery'
LABEL = re.compile(
  r'^(Claims?|Sources?|Setup[^:\n]{0,12}|Criteri(?:on|a)[^:\n]{0,30}|Norms|Command|'
  r'Time[^:\n]{0,30}|Why[^:\n]{0,30}|Note[^:\n]{0,12}):',
  re.M,
)


def registry() -> dict[str, str]:
  """``{name: module}`` from experiments/__main__.py, read without importing."""
  tree = ast.parse((EXPERIMENTS / '__main__.py').read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == 'EXPERIMENTS' for t in node.targets
    ):
      return ast.literal_eval(node.value)
  raise RuntimeError('experiments/__main__.py has no EXPERIMENTS dict')


def _markdown(rst: str) -> str:
  return rst.replace('``', '`')


def describe(module: str) -> tuple[str, list[tuple[str, str]]]:
  """The docstring's title line and its labelled paragraphs."""
  doc = ast.get_docstring(ast.parse((EXPERIMENTS / f'{module}.py').read_text()))
  if not doc:
    raise RuntimeError(f'experiments/{module}.py has no docstring')
  title, _, body = doc.partition('\n')
  parts = LABEL.split(body.strip())
  sections = []
  if parts[0].strip():
    sections.append(('', parts[0]))
  sections += list(zip(parts[1::2], parts[2::2], strict=True))
  return title.strip(), [
    (label, _markdown(' '.join(text.split()))) for label, text in sections
  ]


def _cell(value) -> str:
  if isinstance(value, float):
    value = f'{value:.4g}'
  elif value is None:
    value = 'undefined (null)'
  return str(value).replace('|', '\\|')


def page(name: str, module: str) -> str:
  title, sections = describe(module)
  result = json.loads((EXPERIMENTS / 'results' / f'{name}.json').read_text())
  lines = [f'# {title}', '']
  for label, text in sections:
    lines += [f'**{label}:** {text}' if label else text, '']
  holds = {k: v for k, v in result['summary'].items() if k.startswith('holds')}
  lines += ['## Result', '']
  if holds:
    verdict = ', '.join(
      f'`{k}` = **{"yes" if v else "no"}**' for k, v in holds.items()
    )
    lines += [f'Criterion, computed in the run: {verdict}.', '']
  lines += [
    f'![{name}: the figure written by the full run]({name}.png)',
    '',
    '| quantity | value |',
    '|---|---|',
  ]
  lines += [
    f'| `{_cell(k)}` | {_cell(v)} |'
    for k, v in result['summary'].items()
    if not k.startswith('holds')
  ]
  lines += ['', '## Run', '', '| setting | value |', '|---|---|']
  lines += [f'| `{k}` | {_cell(v)} |' for k, v in result['config'].items()]
  lines += [
    f'| seeds | {", ".join(map(str, result["seeds"]))} |',
    f'| jax | {result["jax"]} |',
    f'| commit | `{result["commit"]}` |',
    '',
    f'Generated from `experiments/results/{name}.json` and `{name}.png`;'
    f' rerun with `python -m experiments run {name}`.',
    '',
  ]
  return '\n'.join(lines)


def index(entries: list[tuple[str, str, dict]]) -> str:
  lines = [
    '# Experiments gallery',
    '',
    'Published findings about BatchNorm, rerun with bnjax on data that ships',
    'inside packages, 3 seeds each. Every page is generated at build time from',
    "the experiment module's docstring and its committed full-run results",
    '(`experiments/results/*.json`, `*.png`); the "holds" column is the',
    'criterion each run computed, set in the module before the full run.',
    '',
    '| experiment | claim | holds (computed) |',
    '|---|---|---|',
  ]
  for name, title, holds in entries:
    verdict = (
      ', '.join(
        f'{k.removeprefix("holds").strip("_") or "claim"}: '
        f'{"yes" if v else "no"}'
        for k, v in holds.items()
      )
      or 'no computed criterion'
    )
    lines.append(f'| [{name}]({name}.md) | {_cell(title)} | {verdict} |')
  lines += ['', '```{toctree}', ':hidden:', '']
  lines += [name for name, _, _ in entries]
  lines += ['```', '']
  return '\n'.join(lines)


def _write(path: pathlib.Path, text: str) -> None:
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def generate(out: pathlib.Path = OUT) -> list[str]:
  """Writes the gallery pages; returns the experiment names it covers."""
  out.mkdir(exist_ok=True)
  entries = []
  for name, module in registry().items():
    png = EXPERIMENTS / 'results' / f'{name}.png'
    if not png.exists():
      raise RuntimeError(
        f'experiments/results/{name}.png is missing: run '
        f'python -m experiments run {name}'
      )
    _write(out / f'{name}.md', page(name, module))
    if (
      not (out / png.name).exists()
      or (out / png.name).read_bytes() != png.read_bytes()
    ):
      shutil.copyfile(png, out / png.name)
    summary = json.loads(
      (EXPERIMENTS / 'results' / f'{name}.json').read_text()
    )['summary']
    entries.append(
      (
        name,
        describe(module)[0],
        {k: v for k, v in summary.items() if k.startswith('holds')},
      )
    )
  _write(out / 'index.md', index(entries))
  return [name for name, _, _ in entries]


def _on_init(app) -> None:
  generate()


def setup(app):
  app.connect('builder-inited', _on_init)
  return {'parallel_read_safe': True, 'version': '1'}
