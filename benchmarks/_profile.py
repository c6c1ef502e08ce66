"""Where a jitted step spends its time: XLA op time by kind, from the profiler.

``op_time_breakdown`` traces a few calls with ``jax.profiler`` (its perfetto
JSON, no TensorBoard needed), matches each executed thunk to its instruction
in the optimized HLO, and labels it by what its fused computation contains:
``conv`` (a convolution or dot), ``bn`` (an op whose source name contains
``BatchNorm``: flax's and bnjax's modules are both called that) or ``other``.
Op times are summed per call. XLA:CPU runs independent thunks concurrently,
so the sum can exceed the wall time; the shares are what to read.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

_COMP = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{\s*$')
_INSTR = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = ')
_CALLS = re.compile(r'(?:calls|to_apply)=%([\w.\-]+)')
_CONV = re.compile(r' (?:convolution|dot)\(')


def _computations(hlo: str) -> dict:
  comps, name = {}, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif line.startswith('}'):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


_FUSION = re.compile(r'^\s*(?:ROOT )?%[\w.\-]+ = .*? fusion\(', re.M)


def program_counts(hlo: str) -> dict:
  """Fusions (each a kernel XLA:CPU compiles) and conditionals in a
  compiled program's text."""
  return dict(
    fusions=len(_FUSION.findall(hlo)), conditionals=hlo.count(' conditional(')
  )


def instruction_kinds(hlo: str) -> dict:
  """Instruction name -> 'conv', 'bn' or 'other', for every instruction."""
  comps = _computations(hlo)
  memo = {}

  def text(comp, seen=frozenset()):
    if comp not in memo:
      body = '\n'.join(comps.get(comp, ()))
      memo[comp] = body + ''.join(
        text(c, seen | {comp}) for c in _CALLS.findall(body) if c not in seen
      )
    return memo[comp]

  kinds = {}
  for lines in comps.values():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      body = line + ''.join(text(c) for c in _CALLS.findall(line))
      kinds[m.group(1)] = (
        'conv'
        if _CONV.search(body)
        else 'bn'
        if 'BatchNorm' in body
        else 'other'
      )
  return kinds


def op_time_breakdown(compiled, args, calls: int = 3) -> dict:
  """Op milliseconds per call by kind, plus the wall time per call, of a
  compiled function (``jax.jit(f).lower(*args).compile()``)."""
  import jax

  kinds = instruction_kinds(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(calls):
      jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    (path,) = glob.glob(f'{d}/**/perfetto_trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  ms = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in kinds:
      ms[kinds[e['name']]] += e['dur'] / 1e3 / calls
  wall = [
    e['dur'] / 1e3
    for e in events
    if e.get('ph') == 'X' and 'block_until_ready' in e.get('name', '')
  ]
  total = sum(ms.values())
  return dict(
    op_ms={k: ms[k] for k in ('conv', 'bn', 'other')},
    share={k: ms[k] / total for k in ('conv', 'bn', 'other')},
    wall_ms=sum(wall) / max(len(wall), 1),
  )
