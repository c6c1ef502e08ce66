"""BN + activation keeping only its output (bnjax.batch_norm_act): memory and
step time against flax's BN + leaky ReLU and bnjax.batch_norm + leaky ReLU.

Run: ``python -m benchmarks run inplace_abn`` (about 2.5 minutes on 2 CPU
cores). Three parts, all on XLA:CPU:

- ``stack``: compiled memory (``memory_analysis``: temporaries) of the
  gradient of a stack of conv + X layers on 32x32x32x8 (1 MiB an
  activation), per layer (the slope between 4 and 8 layers), for X = tanh,
  leaky ReLU, flax BN + leaky ReLU, bnjax.batch_norm + leaky ReLU and
  bnjax.batch_norm_act (leaky ReLU, ELU, identity);
- ``resnet50``: a ResNet-50 train step with leaky ReLU (64x64 images, 1000
  classes; 224x224 compiles no slower but runs 12x longer) with each BN:
  peak and temporary bytes at batch 2 and 4, the bytes per example (the
  slope), the largest batch that fits a 16 GiB budget (linear in the batch),
  and JAX's saved residuals;
- ``time``: step time of that ResNet-50 at batch 4, batch_norm_act over
  bnjax.batch_norm + leaky ReLU, interleaved A B A B after warm-up.

Results: ``results/inplace_abn.json``. On a GPU, ``benchmarks/device.py``
measures the ResNet-50 (224x224) rows.
"""

from __future__ import annotations

import json

from benchmarks import _models, _timing

C = 8
STACK_SHAPE = (32, 32, 32, C)
BUDGET_GIB = 16
SLOPE = 0.01


def _stack_loss(kind, layers):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  import bnjax

  def layer(x, k, g, b):
    x = jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    stats = bnjax.init_batch_stats(C)
    if kind == 'tanh':
      return jnp.tanh(x)
    if kind == 'leaky_relu':
      return nn.leaky_relu(x, SLOPE)
    if kind == 'flax_bn':
      v = {'params': {'scale': g, 'bias': b}, 'batch_stats': stats._asdict()}
      y, _ = nn.BatchNorm(use_running_average=False).apply(
        v, x, mutable=['batch_stats']
      )
      return nn.leaky_relu(y, SLOPE)
    if kind == 'batch_norm':
      y, _ = bnjax.batch_norm(x, stats, g, b, use_running_average=False)
      return nn.leaky_relu(y, SLOPE)
    act = kind.split(':')[1]
    y, _ = bnjax.batch_norm_act(
      x, stats, g, b, use_running_average=False, activation=act
    )
    return y

  def loss(x, ks, gs, bs):
    for i in range(layers):
      x = layer(x, ks[i], gs[i], bs[i])
    return jnp.sum(jnp.sin(x))

  return loss


STACK_KINDS = (
  'tanh',
  'leaky_relu',
  'flax_bn',
  'batch_norm',
  'batch_norm_act:leaky_relu',
  'batch_norm_act:elu',
  'batch_norm_act:identity',
)


def stack_rows(shape, depths=(4, 8), kinds=STACK_KINDS) -> list[dict]:
  import jax
  import jax.numpy as jnp

  rows = []
  for kind in kinds:
    temp = []
    for n in depths:
      x = jnp.ones(shape)
      args = (
        x,
        jnp.ones((n, 3, 3, C, C)) * 0.1,
        jnp.ones((n, C)),
        jnp.zeros((n, C)),
      )
      step = jax.jit(jax.grad(_stack_loss(kind, n), (1, 2, 3)))
      mem = step.lower(*args).compile().memory_analysis()
      temp.append(mem.temp_size_in_bytes)
    per_layer = (temp[1] - temp[0]) / (depths[1] - depths[0])
    act_bytes = 4 * int(jnp.prod(jnp.array(shape)))
    rows.append(
      dict(
        kind=kind,
        temp_mb=[t / 2**20 for t in temp],
        per_layer_mb=per_layer / 2**20,
        per_layer_activations=per_layer / act_bytes,
      )
    )
    print(json.dumps(rows[-1]), flush=True)
  return rows


def build(impl: str, batch: int, size: int, classes: int, stages=(3, 4, 6, 3)):
  """(step, loss, args) of a leaky-ReLU ResNet-50 train step with ``impl``'s
  BN: 'flax', 'bnjax' (batch_norm + leaky ReLU) or 'bnjax_act'."""
  import functools

  import flax.linen as nn
  import jax
  import optax

  import bnjax
  import bnjax.linen

  act = functools.partial(nn.leaky_relu, negative_slope=SLOPE)
  norm = nn.BatchNorm if impl == 'flax' else bnjax.linen.BatchNorm
  norm_act = None
  if impl == 'bnjax_act':
    norm_act = functools.partial(
      bnjax.linen.BatchNormAct, activation=bnjax.LeakyReLU(SLOPE)
    )
  model = _models.resnet50(
    norm, num_classes=classes, act=act, norm_act_cls=norm_act, stages=stages
  )
  x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, classes)
  v = jax.jit(lambda x: model.init(jax.random.key(2), x, train=False))(x)
  tx = optax.sgd(0.1, momentum=0.9)
  step, loss = _models.train_step(model, v, tx)
  return step, loss, (v['params'], v['batch_stats'], tx.init(v['params']), x, y)


def memory(compiled, loss, args) -> dict:
  from jax._src.ad_checkpoint import saved_residuals

  m = compiled.memory_analysis()
  res = saved_residuals(lambda p: loss(p, args[1], *args[3:])[0], args[0])
  # Activations only (a conv kernel is 4-D too): the batch leads.
  batch = args[3].shape[0]
  big = [a for a, _ in res if a.ndim == 4 and a.shape[0] == batch]
  return dict(
    temp_mb=m.temp_size_in_bytes / 2**20,
    peak_mb=(
      m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    )
    / 2**20,
    residuals_4d=len(big),
    residual_4d_mb=sum(a.size * a.dtype.itemsize for a in big) / 2**20,
  )


IMPLS = ('flax', 'bnjax', 'bnjax_act')


def resnet_rows(
  batches, size, classes, stages, budget_gib=BUDGET_GIB
) -> tuple[dict, dict]:
  import jax

  out, compiled = {}, {}
  for impl in IMPLS:
    mems = []
    for b in batches:
      step, loss, a = build(impl, b, size, classes, stages)
      c = jax.jit(step).lower(*a).compile()
      mems.append(memory(c, loss, a))
      compiled[impl] = (c, a)  # the largest batch's, for the timing
    per_ex = (mems[1]['peak_mb'] - mems[0]['peak_mb']) / (
      batches[1] - batches[0]
    )
    fixed = mems[0]['peak_mb'] - per_ex * batches[0]
    out[impl] = dict(
      batches=list(batches),
      mem=mems,
      peak_mb_per_example=per_ex,
      budget_gib=budget_gib,
      largest_batch=int((budget_gib * 1024 - fixed) // per_ex),
    )
    print(json.dumps({impl: out[impl]}), flush=True)
  for impl in IMPLS:
    for k in ('peak', 'temp'):
      key = f'{k}_ratio_vs_flax'
      out[impl][key] = (
        out[impl]['mem'][-1][f'{k}_mb'] / out['flax']['mem'][-1][f'{k}_mb']
      )
  return out, compiled


def main(argv=None):
  args = _timing.parse_args(__doc__, argv)
  smoke = args.smoke
  shape = (4, 8, 8, C) if smoke else STACK_SHAPE
  out = dict(env=_timing.environment())
  out['stack'] = (
    stack_rows(shape, (1, 2), ('leaky_relu', 'batch_norm_act:elu'))
    if smoke
    else stack_rows(shape)
  )
  # The smoke run: one stage of one bottleneck block, seconds to compile.
  batches, size, classes, stages = (
    ((1, 2), 16, 10, (1,)) if smoke else ((2, 4), 64, 1000, (3, 4, 6, 3))
  )
  out['resnet50'], compiled = resnet_rows(batches, size, classes, stages)
  fns = {k: compiled[k][0] for k in ('bnjax', 'bnjax_act')}
  fargs = {k: compiled[k][1] for k in fns}
  samples = _timing.interleaved_samples(
    fns, fargs, rounds=2 if smoke else 7, inner=1
  )
  out['time'] = dict(
    batch=batches[-1],
    size=size,
    **_timing.ratio_columns(samples, num='bnjax_act', den='bnjax'),
  )
  print(json.dumps(out['time']), flush=True)
  if not smoke:
    _timing.write_result('inplace_abn', out)
  return out
