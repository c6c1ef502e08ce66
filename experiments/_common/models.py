"""Models in flax.linen with bnjax BN (and flax's GroupNorm/LayerNorm for peers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import bnjax.linen


def norm_layer(kind: str, train: bool, momentum: float = 0.9, **kw):
  """A normalization layer by name; None for 'none'."""
  if kind == 'bn':
    return bnjax.linen.BatchNorm(
      use_running_average=not train, momentum=momentum, **kw
    )
  if kind == 'ghost':
    return bnjax.linen.BatchNorm(
      use_running_average=not train, momentum=momentum, **kw
    )
  if kind == 'renorm':
    return bnjax.linen.BatchRenorm(
      use_running_average=not train, momentum=momentum, **kw
    )
  if kind == 'gn':
    return nn.GroupNorm(num_groups=8)
  if kind == 'ln':
    return nn.LayerNorm()
  if kind == 'in':  # InstanceNorm: GroupNorm with one channel per group
    return nn.GroupNorm(num_groups=None, group_size=1)
  if kind == 'none':
    return None
  raise ValueError(f'unknown norm {kind!r}')


class MLP(nn.Module):
  """Dense layers with an optional BN before (or after) each nonlinearity."""

  widths: tuple = (100, 100, 100)
  classes: int = 10
  norm: str = 'none'
  place: str = 'before'  # 'before' or 'after' the activation
  act: Callable = nn.sigmoid
  init_scale: float = 1.0
  dense_bias: bool = True
  noise: Any = None  # (n_mu, n_sigma, r): noisy BN (Santurkar et al.)
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape(x.shape[0], -1)
    init = nn.initializers.variance_scaling(
      self.init_scale**2, 'fan_in', 'normal'
    )
    for i, w in enumerate(self.widths):
      x = nn.Dense(w, kernel_init=init, use_bias=self.dense_bias)(x)
      if self.place == 'before':
        x = self._norm(x, train)
      if i == len(self.widths) - 1:
        self.sow('intermediates', 'probe', x)  # the last hidden act. input
      x = self.act(x)
      if self.place == 'after':
        x = self._norm(x, train)
    return nn.Dense(self.classes, kernel_init=init)(x)

  def _norm(self, x, train):
    layer = norm_layer(self.norm, train, momentum=self.bn_momentum)
    x = x if layer is None else layer(x)
    if self.noise is not None and train:
      x = _noisy(self, x)
    return x


def _noisy(module, x):
  """Santurkar et al.'s noisy BN: a random per-unit scale and shift, redrawn
  every step, after the normalization: x * s + m with m ~ U(-n_mu, n_mu)
  and s ~ U(1, n_sigma) (their n_mu, n_sigma; r = 0.1 is the std of an extra
  per-example jitter on both)."""
  n_mu, n_sigma, r = module.noise
  key = module.make_rng('noise')
  k1, k2, k3, k4 = jax.random.split(key, 4)
  c = x.shape[-1]
  m = jax.random.uniform(k1, (c,), minval=-n_mu, maxval=n_mu)
  s = jax.random.uniform(k2, (c,), minval=1.0, maxval=n_sigma)
  m = m + r * jax.random.normal(k3, x.shape)
  s = s * (1 + r * jax.random.normal(k4, x.shape))
  return x * s + m


class CNN1D(nn.Module):
  """A small 1-D CNN for MNIST-1D: conv layers (norm, ReLU), pool, dense.

  With ``dense`` > 0 a hidden Dense layer with its own norm sits before the
  classifier: BN there sees one value per channel per example, so its
  statistics come from the batch size alone (Wu & He's regime). InstanceNorm
  has no statistics for a dense layer (one value per channel), so its arm
  uses LayerNorm there.
  """

  channels: int = 32
  norm: str = 'bn'
  norm_kw: tuple = ()
  axis_name: Any = None
  strides: tuple = (2, 2, 1)
  dense: int = 0
  renorm_steps: int | None = None  # total steps: renorm's warm-up schedule

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(self.norm_kw)
    if self.axis_name is not None:
      kw['axis_name'] = self.axis_name
    call_kw = {}
    if self.norm == 'renorm' and self.renorm_steps is not None:
      # Training steps so far, in the 'schedule' collection (updated with
      # batch_stats): r_max and d_max follow the warm-up schedule.
      step = self.variable('schedule', 'step', lambda: jnp.zeros((), jnp.int32))
      call_kw = renorm_limits(step.value, self.renorm_steps)
      if train and not self.is_initializing():
        step.value += 1
    for stride in self.strides:
      x = nn.Conv(
        self.channels, (3,), strides=(stride,), use_bias=self.norm == 'none'
      )(x)
      layer = norm_layer(self.norm, train, **kw)
      x = x if layer is None else layer(x, **call_kw)
      x = nn.relu(x)
    x = x.mean(1)
    if self.dense:
      x = nn.Dense(self.dense, use_bias=self.norm == 'none')(x)
      layer = norm_layer('ln' if self.norm == 'in' else self.norm, train, **kw)
      x = nn.relu(x if layer is None else layer(x, **call_kw))
    return nn.Dense(10)(x)


def renorm_limits(step, total: int) -> dict:
  """Ioffe 2017's schedule, scaled to ``total`` steps: plain BN (r_max 1,
  d_max 0) for the first 5%, then r_max ramps linearly to 3 by 35% and
  d_max to 5 by 25% (the paper: 5k steps of BN, then r_max over 40k and
  d_max over 25k, of about 130k)."""
  t = jnp.asarray(step, jnp.float32) / total
  ramp = lambda end: jnp.clip((t - 0.05) / (end - 0.05), 0.0, 1.0)
  return dict(r_max=1.0 + 2.0 * ramp(0.35), d_max=5.0 * ramp(0.25))


def values_per_channel(
  strides: tuple, length: int, batch: int, dense: int
) -> list[int]:
  """What each BN layer of CNN1D averages over: batch x positions (SAME
  padding: a stride-s conv leaves ceil(length / s) positions), then the
  batch alone for the dense layer."""
  out = []
  for s in strides:
    length = -(-length // s)
    out.append(batch * length)
  return out + ([batch] if dense else [])
