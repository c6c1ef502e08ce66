"""Sync at pod scale without the hardware: the lowered collectives per path.

Question: what does one synced BN train step put on the wire at 8, 64, 256
and 1024 devices, by each sync path? For every device count D (a separate
process with ``jax_num_cpu_devices=D``) and C in (64, 2048), the train step
(forward and gradient w.r.t. x of a shard_map'd ``batch_norm`` with
``axis_name``) is lowered for TPU with ``jax.export`` and every collective is
read from the module: its kind, per-shard operand floats, the bytes it
delivers to each device, and whether it sits inside a conditional branch
(none does: no sync path branches). Beside it: which path ``sync='auto'``
takes there (``bnjax._moments.psum.auto_uses_psum``, the alpha-beta model of
``sync_model.py``). Run: ``python -m benchmarks run sync_lowering`` (about 1
minute) or ``--smoke`` (8 devices). Writes ``results/sync_lowering.json``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

from benchmarks import _readme, _timing

DEVICES = (8, 64, 256, 1024)
CHANNELS = (64, 2048)
_OP = re.compile(
  r'"stablehlo\.(all_reduce|all_gather)"\(%\S+\).*?'
  r'\(tensor<([0-9x]+)xf32>\)',
  re.S,
)


def case_spans(text: str) -> list[tuple[int, int]]:
  """Character spans of every stablehlo.case (its branch regions)."""
  spans = []
  for m in re.finditer(r'"stablehlo\.case"\(', text):
    i = text.index('({', m.end())
    depth = 0
    for j in range(i, len(text)):
      depth += {'(': 1, ')': -1}.get(text[j], 0)
      if depth == 0:
        break
    spans.append((m.start(), j))
  return spans


def collectives(text: str, d: int) -> list[dict]:
  spans = case_spans(text)
  out = []
  for m in _OP.finditer(text):
    floats = math.prod(int(s) for s in m.group(2).split('x'))
    kind = m.group(1)
    delivered = 4 * floats * (d if kind == 'all_gather' else 1)
    out.append(
      dict(
        kind=kind,
        operand_floats=floats,
        bytes_per_device=delivered,
        conditional=any(a < m.start() < b for a, b in spans),
      )
    )
  return out


def worker(d: int) -> list[dict]:
  import jax

  jax.config.update('jax_num_cpu_devices', d)
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  import bnjax
  from bnjax._moments import psum as _psum

  mesh = Mesh(np.array(jax.devices()[:d]), ('d',))
  rows = []
  for c in CHANNELS:
    stats = bnjax.init_batch_stats(c)
    for sync in ('gather', 'psum'):

      def step(x, w, sync=sync, stats=stats):
        def loss(x):
          y, new = bnjax.batch_norm(
            x, stats, use_running_average=False, axis_name='d', sync=sync
          )
          return jnp.sum(y * w), new

        return jax.grad(loss, has_aux=True)(x)

      f = jax.jit(
        jax.shard_map(
          step, mesh=mesh, in_specs=(P('d'), P('d')), out_specs=(P('d'), P())
        )
      )
      arg = jax.ShapeDtypeStruct((2 * d, c), jnp.float32)
      text = jax.export.export(f, platforms=('tpu',))(arg, arg).mlir_module()
      rows.append(
        dict(
          devices=d,
          channels=c,
          sync=sync,
          auto=('psum' if _psum.auto_uses_psum(d, c) else 'gather'),
          collectives=collectives(text, d),
        )
      )
  return rows


def table(rows) -> str:
  lines = [
    '| D | C | auto | gather: forward bytes/device | psum: forward '
    'bytes/device | in a conditional | backward (both) |',
    '|---|---|---|---|---|---|---|',
  ]
  key = lambda r: (r['devices'], r['channels'])
  for d, c in sorted({key(r) for r in rows}):
    g = next(r for r in rows if key(r) == (d, c) and r['sync'] == 'gather')
    p = next(r for r in rows if key(r) == (d, c) and r['sync'] == 'psum')
    gf, gb = g['collectives'][0], g['collectives'][-1]
    fwd = p['collectives'][:-1]
    cond = [o for r in (g, p) for o in r['collectives'] if o['conditional']]
    lines.append(
      f'| {d} | {c} | {g["auto"]} | {gf["bytes_per_device"]:,} '
      f'({gf["kind"]}) | {sum(o["bytes_per_device"] for o in fwd):,} '
      f'({len(fwd)} {fwd[0]["kind"]}) | '
      f'{len(cond)} collectives | '
      f'{gb["bytes_per_device"]:,} ({gb["kind"]}) |'
    )
  return '\n'.join(lines)


def main(argv=None):
  def extra(p):
    p.add_argument(
      '--worker',
      type=int,
      help='internal: lower at this many devices, print JSON',
    )

  args = _timing.parse_args(__doc__, argv, extra)
  if args.worker:
    print(json.dumps(worker(args.worker)))
    return None
  rows = []
  for d in (8,) if args.smoke else DEVICES:
    # A process per device count: the count is fixed when JAX starts.
    out = subprocess.run(
      [
        sys.executable,
        '-m',
        'benchmarks',
        'run',
        'sync_lowering',
        '--smoke',
        '--worker',
        str(d),
      ],
      capture_output=True,
      text=True,
      check=True,
      cwd=_readme.ROOT,
    )
    rows += json.loads(out.stdout.strip().splitlines()[-1])
  print(table(rows))
  if not args.smoke:
    _timing.write_result(
      'sync_lowering',
      dict(env=_timing.environment(), rows=rows),
      allow_nan=False,
    )
  return rows


def readme_blocks() -> dict[str, str]:
  return {'sync-lowering': table(_timing.latest('sync_lowering')['rows'])}
