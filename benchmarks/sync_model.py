"""Sync cost model: bytes and latency per BN layer from 8 to 1024 devices.

Question: where do the ways of combining exact per-shard partials stop
scaling? Each shard has an exact (count, shift, s1, M2) partial; the gather
sends K = 3C floats of it (``s1`` carries the low-order bits of the
shard's mean, which the exact merge needs; the count of an unmasked shard
is a constant, and stays home). bnjax ships two ways to combine them:

- under shard_map, an all-gather of the K floats per shard (with a
  replicated output), merged with Chan's formula: PyTorch SyncBatchNorm's
  design;
- with ``axis_index_groups``, under pmap and vmap: a psum of a (D, K) buffer
  in which each shard fills its own row ("psum-gather").

and ``sync='psum'``: three all-reduces of constant size, a pmax of C floats
(the shared reference, the largest shard shift), a psum of C + 1 (the
count and the first moments around it) and one of 2C (the sums around the
mean that gives).
``sync='auto'`` takes the psum where this model, on its faster link, prices
the gather above it (``bnjax._moments.psum.auto_uses_psum``; each row
records the choice). An alpha-beta model: a collective costs
``steps * alpha + bytes_per_device * beta``, with

- ring all-reduce of n bytes: ``2 (D-1)`` steps, ``2 (D-1)/D n`` bytes;
- tree (recursive halving/doubling) all-reduce: ``2 log2 D`` steps, same bytes;
- ring all-gather to n output bytes: ``D-1`` steps, ``(D-1)/D n`` bytes;
- tree all-gather: ``log2 D`` steps, same bytes.

The all-gather's per-shard input (4K bytes) is checked against the lowered
HLO at 8 devices. Run: ``python -m benchmarks run sync_model`` (seconds) or
``--smoke``. Writes ``results/sync_model.json``.
"""

from __future__ import annotations

import argparse
import math
import re

from benchmarks import _timing

# Two interconnects, (alpha seconds per step, beta seconds per byte).
LINKS = {'nvlink-like': (5e-6, 1 / 150e9), 'ethernet-like': (20e-6, 1 / 12.5e9)}
DEVICES = [8, 16, 32, 64, 128, 256, 512, 1024]
CHANNELS = [64, 512, 2048]


def cost(kind: str, algo: str, d: int, n_bytes: float, link) -> float:
  """Seconds for one collective under the alpha-beta model."""
  alpha, beta = link
  if kind == 'all_reduce':
    steps = 2 * (d - 1) if algo == 'ring' else 2 * math.log2(d)
    return steps * alpha + 2 * (d - 1) / d * n_bytes * beta
  steps = d - 1 if algo == 'ring' else math.log2(d)
  return steps * alpha + (d - 1) / d * n_bytes * beta


def designs(d: int, c: int):
  from bnjax._moments import psum as _psum

  k = _psum.gather_payload(c, masked=False)
  return {
    'psum_gather': [('all_reduce', 4 * d * k)],
    'all_gather': [('all_gather', 4 * d * k)],
    'psum': [('all_reduce', 4 * n) for n in _psum.psum_payload(c, False)],
  }


def hlo_check(d: int = 8, c: int = 64) -> dict:
  """Bytes of each collective in the lowered sync forward at d devices."""
  import jax
  import numpy as np
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  import bnjax
  from bnjax._moments import psum as _psum

  mesh = Mesh(np.array(jax.devices()[:d]), ('d',))
  f = jax.shard_map(
    lambda x: bnjax.batch_norm(
      x, bnjax.init_batch_stats(c), use_running_average=False, axis_name='d'
    )[0],
    mesh=mesh,
    in_specs=P('d'),
    out_specs=P('d'),
  )
  text = jax.jit(f).lower(jax.ShapeDtypeStruct((4 * d, c), 'float32')).as_text()
  ops = re.findall(
    r'"stablehlo\.(all_reduce|all_gather)"\(%\S+\).*?'
    r'\(tensor<([0-9x]+)xf32>\)',
    text,
    re.S,
  )
  sizes = [
    (op, 4 * math.prod(int(s) for s in shape.split('x'))) for op, shape in ops
  ]
  per_shard = 4 * _psum.gather_payload(c, masked=False)
  return dict(
    devices=d,
    channels=c,
    hlo=sizes,
    model_input_bytes=per_shard,
    model_output_bytes=designs(d, c)['all_gather'][0][1],
    agrees=sizes == [('all_gather', per_shard)],
  )


def table(rows, link):
  lines = [
    '| C | D | psum-gather (ring / tree) µs | all-gather (ring / tree) µs '
    '| psum: pmax + 2 psums (ring / tree) µs |',
    '|---|---|---|---|---|',
  ]
  for r in rows:
    if r['link'] != link or r['devices'] not in (8, 64, 256, 1024):
      continue
    cells = [
      f'{r[f"{k}_ring_us"]:.0f} / {r[f"{k}_tree_us"]:.0f}'
      for k in ('psum_gather', 'all_gather', 'psum')
    ]
    lines.append(
      f'| {r["channels"]} | {r["devices"]} | ' + ' | '.join(cells) + ' |'
    )
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--smoke', action='store_true')
  args = p.parse_args(argv)
  import jax

  try:
    jax.config.update('jax_num_cpu_devices', 8)
  except RuntimeError:
    pass
  check = hlo_check()
  assert check['agrees'], check
  rows = []
  for link_name, link in LINKS.items():
    for c in CHANNELS:
      for d in DEVICES:
        from bnjax._moments import psum as _psum

        row = dict(
          link=link_name,
          channels=c,
          devices=d,
          auto='psum' if _psum.auto_uses_psum(d, c) else 'gather',
        )
        for name, ops in designs(d, c).items():
          row[f'{name}_bytes'] = sum(n for _, n in ops)
          for algo in ('ring', 'tree'):
            row[f'{name}_{algo}_us'] = 1e6 * sum(
              cost(kind, algo, d, n, link) for kind, n in ops
            )
        rows.append(row)
  # Switch point: the smallest D where the psum-gather (best algorithm)
  # costs more than twice the psum path (best algorithm); same for the
  # all-gather.
  switch = {}
  for link_name in LINKS:
    for c in CHANNELS:
      best = lambda r, k: min(r[f'{k}_ring_us'], r[f'{k}_tree_us'])
      for k in ('psum_gather', 'all_gather'):
        over = [
          r['devices']
          for r in rows
          if r['link'] == link_name
          and r['channels'] == c
          and best(r, k) > 2 * best(r, 'psum')
        ]
        switch[f'{k}/{link_name}/C={c}'] = min(over) if over else None
  out = dict(
    env=_timing.environment(),
    links={
      k: dict(alpha_s=a, beta_s_per_byte=b) for k, (a, b) in LINKS.items()
    },
    hlo_check=check,
    switch_devices=switch,
    rows=rows,
  )
  if not args.smoke:
    _timing.write_result('sync_model', out)
    for link_name in LINKS:
      print(f'\n{link_name}\n' + table(rows, link_name))
    print('\nswitch points (D where it costs > 2x the psum path):', switch)
    print('HLO check at 8 devices:', check)
  return out


def sync_model_tables(run: dict) -> str:
  parts = []
  for link, c in run['links'].items():
    parts.append(
      f'{link} link (alpha {c["alpha_s"] * 1e6:g} µs, '
      f'{1 / c["beta_s_per_byte"] / 1e9:g} GB/s):\n\n'
      + table(run['rows'], link)
    )
  return '\n\n'.join(parts)


def readme_blocks() -> dict[str, str]:
  return {'sync-model': sync_model_tables(_timing.latest('sync_model'))}
