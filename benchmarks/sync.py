"""Sync benchmark: cost of synchronized BN on 8 host CPU devices.

Question: what does syncing cost per layer, by each of bnjax's two sync
paths? Times a shard_map'd training step (forward + backward w.r.t. x) with
local statistics, with ``sync='gather'`` (one all-gather of K = 3C
floats per shard), with ``sync='psum'`` (a pmax of C floats, a psum of
C + 1 and one of 2C; the ``psum_fallback`` column is the same step with
the running mean 100 std away, where the running-mean psum of before 0.2.0
fell back to the gather: it now costs the same), and the bare collectives
(all-gather and psum-gather of K floats, one psum of the psum path's 4C + 1),
interleaved,
medians. Each row also records how far each synced path's output and new
statistics sit from one unsharded call on the global batch
(``vs_global``: max relative error; a sync that times the wrong thing
shows here). Run: ``python -m benchmarks run sync``
(about 1 minute) or ``--smoke``. Writes ``results/sync.json``.
"""

from __future__ import annotations

import json

from benchmarks import _readme, _timing


def main(argv=None):
  args = _timing.parse_args(__doc__, argv)
  import jax

  try:  # must precede the first JAX operation
    jax.config.update('jax_num_cpu_devices', 8)
  except RuntimeError:  # already initialized (e.g. inside the test suite)
    if jax.device_count() < 8:
      raise
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import bnjax
  from bnjax._moments import psum as _psum

  mesh = Mesh(np.array(jax.devices()[:8]), ('d',))
  shapes = (
    [(8 * 2, 4, 4, 8)]
    if args.smoke
    else [(8 * 16, 16, 16, 64), (8 * 2, 16, 16, 64), (8 * 64, 512)]
  )
  rows = []
  for shape in shapes:
    c = shape[-1]
    x = jax.device_put(
      jax.random.normal(jax.random.key(0), shape), NamedSharding(mesh, P('d'))
    )
    near = bnjax.init_batch_stats(c)  # data N(0, 1): the psum's steady state
    far = bnjax.BatchStats(jnp.full(c, 100.0), jnp.ones(c))  # check fails

    def step(axis_name, sync='gather', stats=near):
      def f(x):
        def loss(x):
          return jnp.sum(
            bnjax.batch_norm(
              x,
              stats,
              use_running_average=False,
              axis_name=axis_name,
              sync=sync,
            )[0]
            ** 2
          )

        return jax.grad(loss)(x)

      return jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=P('d'), out_specs=P('d'))
      )

    # The floats each path sends a shard, as the library counts them.
    k = _psum.gather_payload(c, False)
    k_psum = sum(_psum.psum_payload(c, False))
    part = jax.device_put(jnp.ones((8, k)), NamedSharding(mesh, P('d')))
    small = jax.device_put(jnp.ones((8, k_psum)), NamedSharding(mesh, P('d')))

    def psum_gather(v):
      rows_ = lax.dynamic_update_slice(
        jnp.zeros((8, k)), v, (lax.axis_index('d'), 0)
      )
      return lax.psum(rows_, 'd')[None]

    def psum_small(v):  # sync='psum''s three all-reduces' floats at once
      return lax.psum(v, 'd')

    def all_gather(v):
      return lax.all_gather(v[0], 'd')[None]

    coll = lambda f: jax.jit(
      jax.shard_map(f, mesh=mesh, in_specs=P('d'), out_specs=P('d'))
    )
    fns = {
      'local': step(None),
      'sync': step('d'),
      'psum': step('d', 'psum'),
      'psum_fallback': step('d', 'psum', far),
      'psum_gather': coll(psum_gather),
      'all_gather': coll(all_gather),
      'psum_small': coll(psum_small),
    }
    fargs = {
      'local': (x,),
      'sync': (x,),
      'psum': (x,),
      'psum_fallback': (x,),
      'psum_gather': (part,),
      'all_gather': (part,),
      'psum_small': (small,),
    }
    t = _timing.interleaved(
      fns, fargs, rounds=2 if args.smoke else 30, inner=1 if args.smoke else 5
    )
    one = bnjax.batch_norm(jax.device_get(x), near, use_running_average=False)
    vs_global = {}
    for sync in ('gather', 'psum'):
      synced = jax.jit(
        jax.shard_map(
          lambda xi, sync=sync: bnjax.batch_norm(
            xi, near, use_running_average=False, axis_name='d', sync=sync
          ),
          mesh=mesh,
          in_specs=P('d'),
          out_specs=(P('d'), P()),
        )
      )(x)
      vs_global[sync] = max(
        float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        for a, b in zip(
          jax.tree.leaves(synced), jax.tree.leaves(one), strict=True
        )
      )
    row = dict(
      shape=list(shape),
      channels=c,
      devices=8,
      step_local_ms=t['local'] * 1e3,
      step_sync_ms=t['sync'] * 1e3,
      step_psum_ms=t['psum'] * 1e3,
      step_psum_fallback_ms=t['psum_fallback'] * 1e3,
      sync_overhead=t['sync'] / t['local'],
      psum_overhead=t['psum'] / t['local'],
      psum_gather_us=t['psum_gather'] * 1e6,
      all_gather_us=t['all_gather'] * 1e6,
      psum_2c9_us=t['psum_small'] * 1e6,
      gather_forward_bytes=8 * k * 4,
      psum_forward_bytes=k_psum * 4,
      backward_bytes=2 * c * 4,
      vs_global=vs_global,
    )
    rows.append(row)
    print(
      json.dumps(
        {
          a: (round(b, 3) if isinstance(b, float) else b)
          for a, b in row.items()
        }
      ),
      flush=True,
    )
  if not args.smoke:
    _timing.write_result('sync', dict(env=_timing.environment(), rows=rows))
  return rows


def sync_table(run: dict) -> str:
  e = run['env']
  lines = [
    f'{e["machine"]}, jax {e["jax"]}, {e["date"]}, commit {_readme.commit(e)}; '
    "a shard_map'd train step (forward and backward of one BN layer) by "
    'each path, and the bare collectives.\n',
    '| shape (global) | C | local step ms | gather step ms | psum step ms | '
    'psum far ms | all-gather µs | psum-gather µs | psum of 3C+1 µs |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in run['rows']:
    lines.append(
      f'| {"x".join(map(str, r["shape"]))} | {r["channels"]} | '
      f'{r["step_local_ms"]:.2f} | {r["step_sync_ms"]:.2f} '
      f'({r["sync_overhead"]:.2f}x) | {r["step_psum_ms"]:.2f} '
      f'({r["psum_overhead"]:.2f}x) | {r["step_psum_fallback_ms"]:.2f} | '
      f'{r["all_gather_us"]:.0f} | {r["psum_gather_us"]:.0f} | '
      f'{r["psum_2c9_us"]:.0f} |'
    )
  return '\n'.join(lines)


def readme_blocks() -> dict[str, str]:
  return {'sync-measured': sync_table(_timing.latest('sync'))}
