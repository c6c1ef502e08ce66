"""StableHLO for the tests: a jitted function exported for GPU and TPU on
this CPU machine, and its conditionals, by what decides them."""

import re

import jax
from jax import export as jax_export

PLATFORMS = ('cuda', 'rocm', 'tpu')
TRITON = jax_export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')


def export(fn, *args, platforms=PLATFORMS) -> str:
  """The StableHLO text of ``jax.jit(fn)(*args)`` exported for ``platforms``.

  With the statistics kernel selected (BNJAX_STATS_KERNEL=pallas), the
  Triton call it lowers to for CUDA has no compatibility guarantee: its
  safety check is disabled, as docs/guides/performance.md tells users."""
  from bnjax._moments import kernel

  checks = [TRITON] if kernel.SELECTED else []
  exp = jax_export.export(
    jax.jit(fn), platforms=platforms, disabled_checks=checks
  )(*args)
  assert tuple(exp.platforms) == platforms
  return exp.mlir_module()


_DEF = re.compile(r'^\s*(%[\w#:]+(?:, %[\w#:]+)*) = (.*)$')


def conditionals(text: str) -> dict:
  """{'data': n, 'platform': n}: the stablehlo.case/if ops, split by
  whether the index is a compile-time constant (lax.platform_dependent's
  dispatch: XLA drops it before compiling) or computed from data."""
  counts = {'data': 0, 'platform': 0}
  for func in re.split(r'\n\s*func\.func ', text)[1:]:
    lines = func.splitlines()
    defs = {}
    for i, line in enumerate(lines):
      m = _DEF.match(line)
      if m:
        for name in m.group(1).split(', '):
          defs[name.split(':')[0]] = i
    for line in lines:
      m = re.search(r'"stablehlo\.(case|if)"\((%[\w#]+)\)', line)
      if m:
        const = _constant(m.group(2), defs, lines)
        counts['platform' if const else 'data'] += 1
  return counts


def _constant(name, defs, lines) -> bool:
  """Whether ``name`` is a constant, or a case whose every branch returns
  a constant (JAX's kept-branch index of a platform switch)."""
  i = defs.get(name)
  if i is None:
    return False
  if 'stablehlo.constant' in lines[i]:
    return True
  if '"stablehlo.case"' not in lines[i]:
    return False
  returned, depth, j = [], 0, i
  while True:
    depth += lines[j].count('{') - lines[j].count('}')
    returned += re.findall(r'stablehlo\.return (%[\w#]+)', lines[j])
    j += 1
    if depth <= 0 and j > i + 1:
      break
  return bool(returned) and all(
    r in defs and 'stablehlo.constant' in lines[defs[r]] for r in returned
  )
