"""The GPU and TPU paths lower on this CPU machine (``jax.export``).

Each train step below is exported for ``('cuda', 'rocm', 'tpu')`` at once,
so every CI run proves that bnjax's code lowers for those backends (its
numerics run in the CPU suite too, with BNJAX_STATS_PATH=accelerator). The
exported GPU and TPU steps hold no data-dependent conditional: on XLA:GPU
one copies its predicate to the host and drains the stream, once per layer
(the linen and nnx model steps: tests/modules/test_model_export.py). The
synced step's lowered module must hold exactly one collective in the forward
(an all-gather of every shard's partial) and one in the backward.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import bnjax
from tests._hlo import PLATFORMS
from tests._hlo import export as _export

X = jax.ShapeDtypeStruct((16, 4, 4, 8), jnp.float32)


def _grad_step(layer):
  """The gradient of a scalar loss of one BN layer, and its new statistics."""

  def step(x, g, b):
    def loss(x, g, b):
      y, new = layer(x, g, b)
      return jnp.sum(jnp.sin(y)), new

    return jax.grad(loss, (0, 1, 2), has_aux=True)(x, g, b)

  return step


G = B = jax.ShapeDtypeStruct((8,), jnp.float32)


@pytest.mark.parametrize(
  'name, layer',
  [
    (
      'batch_norm',
      lambda x, g, b: bnjax.batch_norm(
        x, bnjax.init_batch_stats(8), g, b, use_running_average=False
      ),
    ),
    (
      'batch_norm mask',
      lambda x, g, b: bnjax.batch_norm(
        x,
        bnjax.init_batch_stats(8),
        g,
        b,
        use_running_average=False,
        mask=jnp.arange(16)[:, None, None, None] < 12,
      ),
    ),
    (
      'batch_renorm',
      lambda x, g, b: bnjax.batch_renorm(
        x,
        bnjax.init_renorm_stats(8),
        g,
        b,
        use_running_average=False,
        r_max=3.0,
        d_max=5.0,
      ),
    ),
    (
      'ghost',
      lambda x, g, b: bnjax.batch_norm(
        x,
        bnjax.init_batch_stats(8),
        g,
        b,
        use_running_average=False,
        virtual_batch_size=4,
      ),
    ),
  ],
)
def test_train_step_lowers_for_gpu_and_tpu(name, layer):
  text = _export(_grad_step(layer), X, G, B)
  assert 'stablehlo' in text, name


def test_synced_step_lowers_with_one_collective_each_way():
  mesh = Mesh(np.array(jax.devices()[:8]), ('d',))
  stats = bnjax.init_batch_stats(8)

  def local(x):  # scale/bias off: their gradients need their own psum
    def loss(x):
      y, new = bnjax.batch_norm(
        x, stats, use_running_average=False, axis_name='d'
      )
      return jnp.sum(jnp.sin(y)), new

    return jax.grad(loss, has_aux=True)(x)

  step = jax.shard_map(
    local, mesh=mesh, in_specs=P('d'), out_specs=(P('d'), P())
  )
  assert 'stablehlo' in _export(step, X)
  # One platform at a time: a multi-platform module holds a copy of each op
  # that lowers differently per platform (the all-gather does).
  for platform in PLATFORMS:
    text = _export(step, X, platforms=(platform,))
    ops = re.findall(
      r'stablehlo\.(all_reduce|all_gather|reduce_scatter|'
      r'collective_permute|all_to_all)\b',
      text,
    )
    assert sorted(ops) == ['all_gather', 'all_reduce'], (platform, ops)
