"""Fills the READMEs' benchmark figures from the committed runs.

``python benchmarks/report.py`` rewrites every generated block of
``benchmarks/README.md`` (between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``) from ``benchmarks/results/*.json``; it measures
nothing. Each results file keeps every run (``_timing.write_result``
appends), with its date, commit and ``dirty`` flag, so a range quoted across
runs is computed here from the records, never typed. ``tests/docs/test_readme.py``
checks that the blocks equal what this module generates and that no figure
stands in the README's prose outside them.
"""

from __future__ import annotations

import pathlib
import re

try:
  from benchmarks import _timing
except ImportError:  # run as a script: python benchmarks/report.py
  import _timing  # type: ignore[no-redef]

README = pathlib.Path(__file__).parent / 'README.md'
# The three 4-D NHWC shapes of the issue-2 targets (layer.py's first three).
SHAPES_4D = ([64, 32, 32, 64], [128, 16, 16, 128], [32, 56, 56, 64])


def _commit(env: dict) -> str:
  dirty = {True: ' (dirty)', False: '', None: ' (dirty: not recorded)'}
  return f"{env.get('commit') or '?'}{dirty[env.get('dirty')]}"


def _span(values, fmt='{:.2f}') -> str:
  values = [v for v in values if v is not None]
  if not values:
    return 'n/a'
  lo, hi = min(values), max(values)
  return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else (
    f'{fmt.format(lo)} to {fmt.format(hi)}')


def layer_values(run: dict, mode: str, key: str) -> list:
  rows = {(tuple(r['shape']), r['mode']): r for r in run['rows']}
  return [rows.get((tuple(s), mode), {}).get(key) for s in SHAPES_4D]


def layer_range(mode: str, key: str = 'ratio', last: int = 2) -> tuple:
  """(min, max) of a layer figure over the 4-D shapes of the last runs."""
  values = [v for run in _timing.runs('layer')[-last:]
            for v in layer_values(run, mode, key) if v is not None]
  return min(values), max(values)


def layer_runs_table(runs: list) -> str:
  lines = [
    '| date | commit | train step vs flax | forward vs flax | '
    'step compile vs flax | step vs PyTorch best |',
    '|---|---|---|---|---|---|',
  ]
  for run in runs:
    e = run['env']
    lines.append(
      f"| {e['date']} | {_commit(e)} | "
      f"{_span(layer_values(run, 'step', 'ratio'))} | "
      f"{_span(layer_values(run, 'fwd', 'ratio'))} | "
      f"{_span(layer_values(run, 'step', 'compile_ratio'))} | "
      f"{_span(layer_values(run, 'step', 'torch_ratio'))} |")
  return '\n'.join(lines)


def model_table(run: dict) -> str:
  r = run['row']
  fm, bm = r['flax_mem'], r['bnjax_mem']
  fp, bp = r['flax_profile'], r['bnjax_profile']
  e = run['env']

  def op(p, k):
    return f"{p['op_ms'][k]:.0f} ({p['share'][k]:.0%})"
  rows = [
    ('train step (ms)', f"{r['flax_ms']:.1f}", f"{r['bnjax_ms']:.1f}",
     f"**{r['step_ratio']:.2f}** ({r['step_ratio_q25']:.2f}-"
     f"{r['step_ratio_q75']:.2f})"),
    ('peak memory estimate (args + outputs + temps, MB)',
     f"{fm['peak_mb']:.1f}", f"{bm['peak_mb']:.1f}",
     f"**{r['peak_ratio']:.2f}**"),
    ('temporaries (MB)', f"{fm['temp_mb']:.1f}", f"{bm['temp_mb']:.1f}",
     f"{r['temp_ratio']:.2f}"),
    ('residuals kept for the backward (count / MB)',
     f"{fm['residuals']} / {fm['residual_mb']:.1f}",
     f"{bm['residuals']} / {bm['residual_mb']:.1f}",
     f"{bm['residual_mb'] / fm['residual_mb']:.2f} (MB)"),
    ('compile (s)', f"{r['flax_compile_s']:.2f}", f"{r['bnjax_compile_s']:.2f}",
     f"{r['bnjax_compile_s'] / r['flax_compile_s']:.2f}"),
    ('op time in conv fusions (ms per step)', op(fp, 'conv'), op(bp, 'conv'),
     f"{bp['op_ms']['conv'] / fp['op_ms']['conv']:.2f}"),
    ('op time in BN fusions (ms per step)', op(fp, 'bn'), op(bp, 'bn'),
     f"{r['bn_op_ratio']:.2f}"),
  ]
  head = (f"ResNet-20, batch {r['batch']} of {r['size']}x{r['size']}x3; "
          f"{e['machine']}, jax {e['jax']}, flax {e['flax']}, {e['date']}, "
          f"commit {_commit(e)}.\n\n")
  return head + '\n'.join(
    ['| | flax | bnjax | ratio |', '|---|---|---|---|']
    + [f'| {a} | {b} | {c} | {d} |' for a, b, c, d in rows])


def model_runs_table(runs: list) -> str:
  lines = ['| date | commit | step vs flax | peak memory vs flax | '
           'BN op time vs flax |', '|---|---|---|---|---|']
  for run in runs:
    r, e = run['row'], run['env']
    bn = f"{r['bn_op_ratio']:.2f}" if 'bn_op_ratio' in r else 'n/a'
    lines.append(f"| {e['date']} | {_commit(e)} | {r['step_ratio']:.2f} | "
                 f"{r['peak_ratio']:.2f} | {bn} |")
  return '\n'.join(lines)


def sync_table(run: dict) -> str:
  e = run['env']
  lines = [
    f"{e['machine']}, jax {e['jax']}, {e['date']}, commit {_commit(e)}; "
    'a shard_map\'d train step (forward and backward of one BN layer) by '
    'each path, and the bare collectives.\n',
    '| shape (global) | C | local step ms | gather step ms | psum step ms | '
    'psum + fallback ms | all-gather µs | psum-gather µs | psum of 2C+9 µs |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in run['rows']:
    lines.append(
      f"| {'x'.join(map(str, r['shape']))} | {r['channels']} | "
      f"{r['step_local_ms']:.2f} | {r['step_sync_ms']:.2f} "
      f"({r['sync_overhead']:.2f}x) | {r['step_psum_ms']:.2f} "
      f"({r['psum_overhead']:.2f}x) | {r['step_psum_fallback_ms']:.2f} | "
      f"{r['all_gather_us']:.0f} | {r['psum_gather_us']:.0f} | "
      f"{r['psum_2c9_us']:.0f} |")
  return '\n'.join(lines)


def numerics_before_after() -> str:
  """bnjax's worst variance error before the corrected two-pass (commit
  a451d20) and now, per |mean|/std, one device and synced."""
  before = _timing.latest('numerics_before_a451d20')['rows']
  after = _timing.latest('numerics')['rows']

  def worst(rows, synced, ratio):
    v = [r['rel_err'] for r in rows if r['impl'] == 'bnjax'
         and r['synced'] == synced and r['ratio'] == ratio]
    return f'{max(v):.1e}' if v else 'n/a'
  ratios = sorted({r['ratio'] for r in after})
  lines = ['| bnjax, worst of every function and layout | '
           + ' | '.join(f'{q:.0e}' for q in ratios) + ' |',
           '|---' * (len(ratios) + 1) + '|']
  for label, rows, synced in [
      ('before a451d20, 1 device', before, False),
      ('before a451d20, 8 synced', before, True),
      ('now, 1 device', after, False),
      ('now, 8 synced', after, True),
      ("now, 8, sync='psum'", after, 'psum')]:
    lines.append(f'| {label} | '
                 + ' | '.join(worst(rows, synced, q) for q in ratios) + ' |')
  return '\n'.join(lines)


def reductions_table(run: dict) -> str:
  e = run['env']
  shape = 'x'.join(map(str, run['shape']))
  lines = [
    f"{shape} float32, {e['machine']}, jax {e['jax']}, {e['date']}, commit "
    f"{_commit(e)}; medians of {run['rounds']} interleaved rounds, the "
    'paired per-round ratio\'s quartiles in brackets.\n',
    '| form | ms | vs two plain sums |', '|---|---|---|']
  for r in run['rows']:
    lines.append(f"| `{r['form']}` | {r['ms']:.2f} | {r['vs_two_sums']:.2f} "
                 f"({r['vs_q25']:.2f}-{r['vs_q75']:.2f}) |")
  c = run['compile_s']
  lines.append(f"\nCompile of a toy reduce-and-normalize: {c['plain'] * 1e3:.0f}"
               f" ms, and {c['with_cond'] * 1e3:.0f} ms with a `lax.cond` whose "
               'branch only doubles a vector.')
  return '\n'.join(lines)


def sync_model_tables(run: dict) -> str:
  try:
    from benchmarks import sync_model
  except ImportError:  # run as a script
    import sync_model  # type: ignore[no-redef]
  parts = []
  for link, c in run['links'].items():
    parts.append(f"{link} link (alpha {c['alpha_s'] * 1e6:g} µs, "
                 f"{1 / c['beta_s_per_byte'] / 1e9:g} GB/s):\n\n"
                 + sync_model.table(run['rows'], link))
  return '\n\n'.join(parts)


def sync_lowering_table(run: dict) -> str:
  try:
    from benchmarks import sync_lowering
  except ImportError:  # run as a script
    import sync_lowering  # type: ignore[no-redef]
  return sync_lowering.table(run['rows'])


def compile_table(run: dict) -> str:
  lines = [
    f"Run of {run['env'].get('date')} at {_commit(run['env'])}, jax "
    f"{run['env'].get('jax')}, {run['env'].get('machine')}:",
    '',
    '| model | input | flax s | bnjax s | vs flax | pairs (A B A B) |',
    '|---|---|---|---|---|---|',
  ]
  for r in run['rows']:
    lines.append(
      f"| {r['model']} | {r['batch']}x{r['size']}x{r['size']}x3 | "
      f"{r['flax_s']:.2f} | {r['bnjax_s']:.2f} | **{r['ratio']:.2f}** | "
      f"{_span(r['pair_ratios'])} |"
    )
  return '\n'.join(lines)


def device_table(run: dict) -> str:
  env = run['env']
  lines = [
    f"Run of {env.get('date')} at {_commit(env)} on {env.get('devices')} "
    f"(jax {env.get('jax')}, flax {env.get('flax')}):",
    '',
    '| what | flax ms | bnjax ms | vs flax (quartiles) |',
    '|---|---|---|---|',
  ]
  for r in run['layer']:
    shape = 'x'.join(map(str, r['shape']))
    lines.append(
      f"| layer {shape} {r['mode']} | {r['flax_ms']:.3f} | {r['bnjax_ms']:.3f}"
      f" | **{r['ratio']:.2f}** ({r['ratio_q25']:.2f}-{r['ratio_q75']:.2f}) |"
    )
  m = run['resnet50']
  lines.append(
    f"| ResNet-50 step, batch {m['batch']} of {m['size']}x{m['size']} | "
    f"{m['flax_ms']:.2f} | {m['bnjax_ms']:.2f} | **{m['step_ratio']:.2f}** "
    f"({m['step_ratio_q25']:.2f}-{m['step_ratio_q75']:.2f}) |"
  )
  worst = max(r['err'] for r in run['numerics'] if r['impl'].startswith('bnjax'))
  lines += [
    '',
    f"ResNet-50 compile time vs flax: {m['compile_ratio']:.2f}; conditionals "
    f"in bnjax's compiled step: {m['bnjax']['conditionals']}; bnjax's worst "
    f'variance error against float64 at |mean|/std 1e2 to 1e6 on this device: '
    f'{worst:.1e}.',
  ]
  return '\n'.join(lines)


def blocks() -> dict[str, str]:
  """Every generated block of benchmarks/README.md, by marker name."""
  try:
    from benchmarks import layer
  except ImportError:  # run as a script
    import layer  # type: ignore[no-redef]
  return {
    'layer': layer.readme_block(_timing.latest('layer')),
    'layer-runs': layer_runs_table(_timing.runs('layer')),
    'reductions': reductions_table(_timing.latest('reductions')),
    'numerics-before-after': numerics_before_after(),
    'sync-measured': sync_table(_timing.latest('sync')),
    'sync-lowering': sync_lowering_table(_timing.latest('sync_lowering')),
    'sync-model': sync_model_tables(_timing.latest('sync_model')),
    'model': model_table(_timing.latest('model')),
    'model-runs': model_runs_table(_timing.runs('model')),
    'compile': compile_table(_timing.latest('compile')),
    'device': device_table(_timing.latest('device')),
  }


def block_pattern(name: str) -> str:
  return f'(<!-- {name}:start -->\n)(.*?)(\n?<!-- {name}:end -->)'


def fill(path: pathlib.Path = README) -> pathlib.Path:
  text = path.read_text()
  for name, body in blocks().items():
    text, n = re.subn(block_pattern(name),
                      lambda m, body=body: m.group(1) + body + '\n'
                      + m.group(3).lstrip('\n'), text, flags=re.S)
    if n != 1:
      raise ValueError(f'{path} needs one pair of {name} markers')
  path.write_text(text)
  return path


if __name__ == '__main__':
  print(f'filled {fill()}')
