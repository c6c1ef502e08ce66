# Ported from flax 0.12.12 tests/linen/summary_test.py by tests/peer/port_flax.py: only the
# test methods that use BatchNorm, with Flax's BatchNorm swapped for bnjax's.
# Do not edit by hand; regenerate. Original copyright notice follows.
# Copyright 2024 The Flax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
import bnjax.linen

import enum

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from jax import random

from flax import linen as nn
from flax import struct
from flax.core.scope import Array
from flax.linen import summary

# Parse absl flags test_srcdir and test_tmpdir.
jax.config.parse_flags_with_absl()

CONSOLE_TEST_KWARGS = dict(force_terminal=False, no_color=True, width=10_000)


def _get_shapes(pytree):
  return jax.tree_util.tree_map(
    lambda x: x.shape if hasattr(x, 'shape') else x, pytree
  )


def _get_obj_repr_value(x):
  if isinstance(x, summary._ObjectRepresentation):
    return x.obj
  return x


class ConvBlock(nn.Module):
  features: int
  kernel_size: list[int]
  test_sow: bool

  def setup(self) -> None:
    self.conv = nn.Conv(self.features, self.kernel_size)
    self.bn = bnjax.linen.BatchNorm()
    self.dropout = nn.Dropout(0.5)

  def block_method(self, x: Array, training: bool) -> Array:
    x = self.conv(x)

    if self.test_sow:
      self.sow('intermediates', 'INTERM', x)

    x = self.bn(x, use_running_average=not training)
    x = self.dropout(x, deterministic=not training)
    x = nn.relu(x)
    return x

  def __call__(self, x: Array, training: bool) -> Array:
    x = self.conv(x)

    if self.test_sow:
      self.sow('intermediates', 'INTERM', x)

    x = self.bn(x, use_running_average=not training)
    x = self.dropout(x, deterministic=not training)
    x = nn.relu(x)
    return x


class CNN(nn.Module):
  test_sow: bool

  def setup(self) -> None:
    self.block1 = ConvBlock(32, [3, 3], test_sow=self.test_sow)
    self.block2 = ConvBlock(64, [3, 3], test_sow=self.test_sow)
    self.dense = nn.Dense(10)

  def cnn_method(self, x: Array, training: bool) -> Array:
    x = self.block1.block_method(x, training=training)
    x = self.block2.block_method(x, training=training)
    x = x.mean(axis=(1, 2))

    if self.test_sow:
      self.sow('intermediates', 'INTERM', x)

    x = self.dense(x)

    return x, dict(a=x, b=x + 1.0)

  def __call__(self, x: Array, training: bool) -> Array:
    x = self.block1.block_method(x, training=training)
    x = self.block2.block_method(x, training=training)
    x = x.mean(axis=(1, 2))

    if self.test_sow:
      self.sow('intermediates', 'INTERM', x)

    x = self.dense(x)

    return x, dict(a=x, b=x + 1.0)


class SummaryTest(absltest.TestCase):








  def test_module_reuse(self):
    class ConvBlock(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.Conv(32, [3, 3])(x)
        x = bnjax.linen.BatchNorm(use_running_average=True)(x)
        x = nn.Dropout(0.5, deterministic=True)(x)
        x = nn.relu(x)
        return x

    class CNN(nn.Module):
      @nn.compact
      def __call__(self, x):
        block = ConvBlock()
        x = block(x)
        x = block(x)
        x = block(x)
        return x

    x = jnp.ones((4, 28, 28, 32))
    module_repr = CNN().tabulate(
      jax.random.key(0),
      x=x,
      show_repeated=True,
      console_kwargs=CONSOLE_TEST_KWARGS,
      compute_flops=True,
      compute_vjp_flops=True,
    )
    lines = module_repr.splitlines()

    # first call
    self.assertIn('ConvBlock_0/Conv_0', lines[9])
    self.assertIn('bias', lines[9])
    self.assertIn('ConvBlock_0/BatchNorm_0', lines[14])
    self.assertIn('mean', lines[14])
    self.assertIn('bias', lines[14])
    self.assertIn('ConvBlock_0/Dropout_0', lines[19])

    # second call
    self.assertIn('ConvBlock_0/Conv_0', lines[23])
    self.assertNotIn('bias', lines[23])
    self.assertIn('ConvBlock_0/BatchNorm_0', lines[25])
    self.assertNotIn('mean', lines[25])
    self.assertNotIn('bias', lines[25])
    self.assertIn('ConvBlock_0/Dropout_0', lines[27])

    # third call
    self.assertIn('ConvBlock_0/Conv_0', lines[31])
    self.assertNotIn('bias', lines[31])
    self.assertIn('ConvBlock_0/BatchNorm_0', lines[33])
    self.assertNotIn('mean', lines[33])
    self.assertNotIn('bias', lines[33])
    self.assertIn('ConvBlock_0/Dropout_0', lines[35])

    # Test that CNN FLOPs are 3x ConvBlock FLOPs.
    args = ({'dropout': random.key(0), 'params': random.key(1)}, x)
    cnn = summary._get_module_table(
      CNN(),
      depth=1,
      show_repeated=True,
      compute_flops=True,
      compute_vjp_flops=True,
    )(*args, mutable=True)

    block = summary._get_module_table(
      ConvBlock(),
      depth=1,
      show_repeated=True,
      compute_flops=True,
      compute_vjp_flops=True,
    )(*args, mutable=True)

    # Total forward/backward FLOPs equal to their sums of sub blocks.
    self.assertEqual(cnn[0].flops, sum(r.flops for r in cnn[1:]))
    self.assertEqual(cnn[0].vjp_flops, sum(r.vjp_flops for r in cnn[1:]))

    # Each sub block has cost equal to ConvBlock instantiated separately.
    for r in cnn[1:]:
      self.assertEqual(r.flops, block[0].flops)
      self.assertEqual(r.vjp_flops, block[0].vjp_flops)









