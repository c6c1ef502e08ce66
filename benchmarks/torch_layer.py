"""PyTorch peer for the layer benchmark: torch.nn.BatchNorm in its own process.

Question: how fast is PyTorch's CPU BatchNorm (``torch==2.13.0``, 2 threads)
on the layer benchmark's shapes and modes, in both memory layouts (NCHW and
channels_last)? Run in its own process, so its thread pool does not fight
XLA's: ``python -m benchmarks run torch_layer`` (about 1 minute) or ``--smoke``.
Writes ``results/torch_layer.json``, which ``layer.py`` reads to report
bnjax against PyTorch's best layout. Modes as in layer.py: ``fwd`` (training
forward), ``grad`` (gradients of <y, ct> for x, weight, bias) and ``step``
(forward and backward together).
"""

from __future__ import annotations

import json
import time

from benchmarks import _timing
from benchmarks.layer import MODES, SHAPES


def _case(torch, shape, layout, mode):
  c = shape[-1]
  bn = (
    torch.nn.BatchNorm2d(c) if len(shape) == 4 else torch.nn.BatchNorm1d(c)
  ).train()
  g = torch.Generator().manual_seed(0)
  nchw = (shape[0], c) + tuple(shape[1:-1])
  x = torch.randn(nchw, generator=g)
  ct = torch.randn(nchw, generator=g)
  if layout == 'channels_last':
    x = x.contiguous(memory_format=torch.channels_last)
    ct = ct.contiguous(memory_format=torch.channels_last)
    bn = bn.to(memory_format=torch.channels_last)
  x.requires_grad_(mode != 'fwd')

  def run():
    if mode == 'fwd':
      with torch.no_grad():
        return bn(x)
    y = bn(x)
    gx, gw, gb = torch.autograd.grad(y, (x, bn.weight, bn.bias), ct)
    return y if mode == 'step' else gx

  return run


def time_case(run, rounds, inner):
  for _ in range(3):
    run()
  ts = []
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(inner):
      run()
    ts.append((time.perf_counter() - t) / inner)
  ts.sort()
  return ts[len(ts) // 2]


def main(argv=None):
  args = _timing.parse_args(__doc__, argv)
  import torch

  torch.set_num_threads(2)
  shapes = [(8, 4, 4, 8)] if args.smoke else SHAPES
  layouts = ('nchw', 'channels_last')
  rows = []
  for shape in shapes:
    for mode in MODES:
      runs = {
        l: _case(torch, shape, l, mode)
        for l in layouts
        if len(shape) == 4 or l == 'nchw'
      }
      t = {l: [] for l in runs}
      for _ in range(2 if args.smoke else 5):  # interleave the layouts
        for l, r in runs.items():
          t[l].append(
            time_case(r, 2 if args.smoke else 5, 1 if args.smoke else 5)
          )
      row = dict(
        shape=list(shape),
        mode=mode,
        **{f'{l}_ms': 1e3 * sorted(v)[len(v) // 2] for l, v in t.items()},
      )
      row['best_ms'] = min(row[f'{l}_ms'] for l in runs)
      rows.append(row)
      print(json.dumps(row), flush=True)
  if not args.smoke:
    out = dict(
      env=dict(torch=torch.__version__, threads=2, **_timing.environment()),
      rows=rows,
    )
    _timing.write_result('torch_layer', out)
  return rows
