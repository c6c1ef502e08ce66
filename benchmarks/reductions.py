"""Why the forward reads x twice: every way to get sum(x) and sum(x*x), timed.

The question behind the layer benchmark's pass count: can one read of x give
both per-channel sums faster than two plain reductions on XLA:CPU? Times,
interleaved after warm-up, at 65536x64 float32 (16 MB, 64 channels), of:
two plain ``jnp.sum``s (what bnjax's forward runs); ``sum(x - s)`` with a
per-channel ``s`` fused in (the shifted and two-pass forms); one variadic
``lax.reduce`` of both; one reduction over ``stack([x, x*x])``; a dot with a
ones vector; one complex sum of ``x + i x*x``; and an L2-sized chunk loop
(``lax.scan``). Also the compile time of a toy reduce-and-normalize with and
without a ``lax.cond`` whose branch only doubles a vector: the price of
bnjax's exact fallback at compile time.

Run: ``python -m benchmarks run reductions`` (about 1 minute) or ``--smoke``.
Appends a run to ``results/reductions.json``; the README's table is filled
from it by ``python -m benchmarks report``.
"""

from __future__ import annotations

import numpy as np

from benchmarks import _readme, _timing

SHAPE = (65536, 64)


def forms():
  import jax
  import jax.numpy as jnp
  from jax import lax

  def two_sums(x, s):
    return jnp.sum(x, 0), jnp.sum(x * x, 0)

  def shifted_sums(x, s):
    d = x - s
    return jnp.sum(d, 0), jnp.sum(d * d, 0)

  def variadic(x, s):
    z = jnp.zeros((), x.dtype)
    return lax.reduce(
      (x, x * x), (z, z), lambda a, b: (a[0] + b[0], a[1] + b[1]), (0,)
    )

  def stacked(x, s):
    both = jnp.sum(jnp.stack([x, x * x]), 1)
    return both[0], both[1]

  def dot_ones(x, s):
    both = jnp.ones((x.shape[0],), x.dtype) @ jnp.concatenate([x, x * x], 1)
    return both[: x.shape[1]], both[x.shape[1] :]

  def complex_sum(x, s):
    c = jnp.sum(lax.complex(x, x * x), 0)
    return c.real, c.imag

  def chunk_loop(x, s):
    chunks = x.reshape(-1, 4096, x.shape[1])

    def body(acc, c):
      return (acc[0] + jnp.sum(c, 0), acc[1] + jnp.sum(c * c, 0)), None

    z = jnp.zeros(x.shape[1], x.dtype)
    return lax.scan(body, (z, z), chunks)[0]

  return {
    k: jax.jit(f)
    for k, f in dict(
      two_sums=two_sums,
      shifted_sums=shifted_sums,
      variadic_reduce=variadic,
      stacked_reduce=stacked,
      dot_with_ones=dot_ones,
      complex_sum=complex_sum,
      scan_chunks=chunk_loop,
    ).items()
  }


def cond_compile(repeats: int) -> dict:
  """Compile seconds of a toy reduce-and-normalize, without and with a cond.

  Each compile is of a freshly made function, so JAX's caches never answer.
  """
  import jax
  import jax.numpy as jnp
  from jax import lax

  def make(cond: bool):
    def f(x):
      m = jnp.mean(x, 0)
      if cond:
        m = lax.cond(jnp.any(m > 1e3), lambda v: 2 * v, lambda v: v, m)
      return (x - m) * lax.rsqrt(jnp.mean(x * x, 0) - m * m + 1e-5)

    return jax.jit(f)

  x = jnp.ones((256, 64))
  return {
    name: _timing.compile_seconds(lambda c=c: make(c), (x,), repeats)
    for name, c in dict(plain=False, with_cond=True).items()
  }


def main(argv=None):
  args = _timing.parse_args(__doc__, argv)
  import jax
  import jax.numpy as jnp

  shape = (4096, 8) if args.smoke else SHAPE
  x = jax.random.normal(jax.random.key(0), shape)
  s = jnp.zeros(shape[1])
  fns = forms()
  ref = fns['two_sums'](x, s)
  for name, f in fns.items():  # every form computes the same two sums
    got = f(x, s)
    for a, b in zip(got, ref, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2, err_msg=name)
  rounds, inner = (2, 1) if args.smoke else (15, 5)
  samples = _timing.interleaved_samples(
    fns, {k: (x, s) for k in fns}, rounds, inner
  )
  base = samples['two_sums']
  rows = []
  for name, t in samples.items():
    q25, q75 = _timing.ratio_quartiles(t, base)
    rows.append(
      dict(
        form=name,
        ms=float(np.median(t)) * 1e3,
        vs_two_sums=float(np.median(t) / np.median(base)),
        vs_q25=q25,
        vs_q75=q75,
      )
    )
  compile_s = cond_compile(1 if args.smoke else 5)
  out = dict(
    env=_timing.environment(),
    shape=list(shape),
    rounds=rounds,
    inner=inner,
    rows=rows,
    compile_s=compile_s,
  )
  for r in rows:
    print(f'{r["form"]:16s} {r["ms"]:8.3f} ms  {r["vs_two_sums"]:.2f}x')
  print('compile s:', compile_s)
  if not args.smoke:
    _timing.write_result('reductions', out)
  return out


def reductions_table(run: dict) -> str:
  e = run['env']
  shape = 'x'.join(map(str, run['shape']))
  lines = [
    f'{shape} float32, {e["machine"]}, jax {e["jax"]}, {e["date"]}, commit '
    f'{_readme.commit(e)}; medians of {run["rounds"]} interleaved rounds, the '
    "paired per-round ratio's quartiles in brackets.\n",
    '| form | ms | vs two plain sums |',
    '|---|---|---|',
  ]
  for r in run['rows']:
    lines.append(
      f'| `{r["form"]}` | {r["ms"]:.2f} | {r["vs_two_sums"]:.2f} '
      f'({r["vs_q25"]:.2f}-{r["vs_q75"]:.2f}) |'
    )
  c = run['compile_s']
  lines.append(
    f'\nCompile of a toy reduce-and-normalize: {c["plain"] * 1e3:.0f}'
    f' ms, and {c["with_cond"] * 1e3:.0f} ms with a `lax.cond` whose '
    'branch only doubles a vector.'
  )
  return '\n'.join(lines)


def readme_blocks() -> dict[str, str]:
  return {'reductions': reductions_table(_timing.latest('reductions'))}
