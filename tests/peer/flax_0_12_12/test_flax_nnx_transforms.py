# Ported from flax 0.12.12 tests/nnx/transforms_test.py by tests/peer/port_flax.py: only the
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
import bnjax.nnx

import os
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import dataclasses
from functools import partial
import typing as tp

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
from flax.nnx.transforms import general
import jax
from jax.experimental import checkify, mesh_utils
import jax.numpy as jnp
import numpy as np
import optax


class TestJIT(parameterized.TestCase):










  def test_graph_updates_unflatten(self):
    n = 0

    class Foo(nnx.Module):
      def __init__(self, *, rngs: nnx.Rngs):
        self.a = nnx.Linear(2, 2, rngs=rngs)
        self.b = bnjax.nnx.BatchNorm(2, rngs=rngs)

    @nnx.jit(graph=True, graph_updates=True)
    def f(m: Foo):
      nonlocal n
      n += 1
      m.a, m.b = m.b, m.a  # type: ignore

    m = Foo(rngs=nnx.Rngs(0))
    a = m.a
    b = m.b
    a_kernel = a.kernel[...]
    a_bias = a.bias[...]
    b_scale = b.scale[...]
    b_bias = b.bias[...]
    b_mean = b.mean[...]
    b_var = b.var[...]

    f(m)

    self.assertEqual(n, 1)
    self.assertIs(m.a, b)
    self.assertIs(m.b, a)
    np.testing.assert_allclose(a_kernel, a.kernel[...])
    np.testing.assert_allclose(a_bias, a.bias[...])
    np.testing.assert_allclose(b_scale, b.scale[...])
    np.testing.assert_allclose(b_bias, b.bias[...])
    np.testing.assert_allclose(b_mean, b.mean[...])
    np.testing.assert_allclose(b_var, b.var[...])

    f(m)

    self.assertEqual(n, 2)
    self.assertIs(m.a, a)
    self.assertIs(m.b, b)

    f(m)

    self.assertEqual(n, 2)
    self.assertIs(m.a, b)
    self.assertIs(m.b, a)

    f(m)

    self.assertEqual(n, 2)
    self.assertIs(m.a, a)
    self.assertIs(m.b, b)






























class TestScan(parameterized.TestCase):







































  def test_complex(self):
    state_axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class MLP(nnx.Module):
      @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = MLP(rngs=nnx.Rngs(0))
    module.set_attributes(deterministic=False, use_running_average=False)

    assert module.linear.kernel.shape == (5, 3, 3)
    assert module.linear.bias.shape == (5, 3)
    assert module.node.shape == (2,)

    x = jnp.ones((1, 3))
    y, _ = module(x)

    assert y.shape == (1, 3)

  @parameterized.parameters(True, False)
  def test_complex_functional(self, graph_mode):
    class MLP(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.BatchStat(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      m = MLP(rngs=rngs)
      m.set_attributes(deterministic=False, use_running_average=False)
      return m

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))

    x = jnp.ones((1, 3))
    y, _ = forward(module, x)

    assert y.shape == (1, 3)

  def test_complex_view(self):
    state_axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class MLP(nnx.Module):
      @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = MLP(rngs=nnx.Rngs(0))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    assert new_module.linear.kernel.shape == (5, 3, 3)
    assert new_module.linear.bias.shape == (5, 3)
    assert new_module.node.shape == (2,)

    x = jnp.ones((1, 3))
    y, _ = new_module(x)

    assert y.shape == (1, 3)

  @parameterized.parameters(True, False)
  def test_complex_view_functional(self, graph_mode):
    class MLP(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      return MLP(rngs=rngs)

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    x = jnp.ones((1, 3))
    y, _ = forward(new_module, x)

    assert y.shape == (1, 3)

  def test_complex_broadcast_dropout(self):
    state_axes = nnx.StateAxes({(nnx.Param, 'params'): 0, ...: None})

    class MLP(nnx.Module):
      @nnx.split_rngs(splits=5, only='params', graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.split_rngs(splits=5, only='params', graph=True, graph_updates=True)
      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = MLP(rngs=nnx.Rngs(params=0, dropout=1))
    module.set_attributes(deterministic=False, use_running_average=False)

    assert module.linear.kernel.shape == (5, 3, 3)
    assert module.linear.bias.shape == (5, 3)
    assert module.node.shape == (2,)

    x = jnp.ones((1, 3))
    y, _ = module(x)

    assert y.shape == (1, 3)

  @parameterized.parameters((False,))
  def test_complex_broadcast_dropout_functional(self, graph_mode):

    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = nnx.gelu(self.dropout(self.bn(self.linear(x))))
        return x, None

    rngs = nnx.Rngs(params=0, dropout=1)
    dummy_module = Block(rngs)
    (module_axes, rngs_axes) = nnx.prefix((dummy_module, rngs), {(nnx.Param, 'params', 'dropout'): 0, ...: None}, graph=graph_mode)

    @nnx.with_rngs(split={'params': 5}, broadcast={'dropout': 5}, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=(rngs_axes,), out_axes=module_axes, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs: nnx.Rngs):
      return Block(rngs=rngs)

    module = create(rngs)

    @nnx.scan(in_axes=(module_axes, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      module = nnx.with_attributes(module, deterministic=False, use_running_average=False)
      return module(x)

    assert module.linear.kernel.shape == (5, 3, 3)
    assert module.linear.bias.shape == (5, 3)
    assert module.node.shape == (2,)

    x = jnp.ones((1, 3))
    y, _ = forward(module, x)

    assert y.shape == (1, 3)

  def test_complex_broadcast_dropout_view(self):
    state_axes = nnx.StateAxes({(nnx.Param, 'params'): 0, ...: None})

    class MLP(nnx.Module):
      @nnx.split_rngs(splits=5, only='params', graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.split_rngs(splits=5, only='params', graph=True, graph_updates=True)
      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = MLP(rngs=nnx.Rngs(params=0, dropout=1))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    assert new_module.linear.kernel.shape == (5, 3, 3)
    assert new_module.linear.bias.shape == (5, 3)
    assert new_module.node.shape == (2,)

    x = jnp.ones((1, 3))
    y, _ = new_module(x)

    assert y.shape == (1, 3)

  def test_complex_decorator(self):
    state_axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class Block(nnx.Module):
      @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), axis_size=5, graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = Block(rngs=nnx.Rngs(0))
    module.set_attributes(deterministic=False, use_running_average=False)

    assert module.d == 3
    assert module.linear.kernel.shape == (5, 3, 3)
    assert module.linear.bias.shape == (5, 3)
    assert module.node.shape == (2,)

    x = jnp.ones((1, 3))
    y, out = module(x)

    assert y.shape == (1, 3)
    assert out is None

  @parameterized.parameters(True, False)
  def test_complex_decorator_functional(self, graph_mode):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      m = Block(rngs=rngs)
      m.set_attributes(deterministic=False, use_running_average=False)
      return m

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))

    x = jnp.ones((1, 3))
    y, _ = forward(module, x)

    assert y.shape == (1, 3)

  @parameterized.parameters(True, False)
  def test_complex_broadcast_dropout_view_functional(self, graph_mode):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      m = Block(rngs=rngs)
      m.set_attributes(deterministic=False, use_running_average=False)
      return m

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))

    x = jnp.ones((1, 3))
    y, _ = forward(module, x)

    assert y.shape == (1, 3)

  def test_complex_decorator_view(self):
    state_axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

    class Block(nnx.Module):
      @nnx.split_rngs(splits=5, graph=True, graph_updates=True)
      @nnx.vmap(in_axes=(state_axes, state_axes), axis_size=5, graph=True, graph_updates=True)
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      @nnx.scan(in_axes=(state_axes, nnx.Carry), graph=True, graph_updates=True)
      def __call__(self, x: jax.Array):
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    module = Block(rngs=nnx.Rngs(0))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    assert new_module.d == 3
    assert new_module.linear.kernel.shape == (5, 3, 3)
    assert new_module.linear.bias.shape == (5, 3)
    assert new_module.node.shape == (2,)

    x = jnp.ones((1, 3))
    y, out = new_module(x)

    assert y.shape == (1, 3)
    assert out is None

  @parameterized.parameters(True, False)
  def test_complex_decorator_view_functional(self, graph_mode):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.d = 3
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.node = nnx.Variable(jnp.ones((2,)))

      def __call__(self, x: jax.Array) -> tp.Tuple[jax.Array, None]:
        x = self.linear(x)
        x = self.bn(x)
        x = self.dropout(x)
        x = nnx.gelu(x)
        return x, None

    @nnx.split_rngs(splits=5, graph=graph_mode, graph_updates=False)
    @nnx.vmap(in_axes=0, axis_size=5, graph=graph_mode, graph_updates=False)
    def create(rngs):
      return Block(rngs=rngs)

    @nnx.scan(in_axes=(0, nnx.Carry), graph=graph_mode, graph_updates=False)
    def forward(module, x):
      return module(x)

    module = create(nnx.Rngs(0))
    new_module = nnx.view(module, deterministic=False, use_running_average=False)

    assert new_module.d == 3

    x = jnp.ones((1, 3))
    y, _ = forward(new_module, x)

    assert y.shape == (1, 3)
























class TestVmap(parameterized.TestCase):















  def test_state_axes_simple(self):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, use_running_average=False, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    state_axes = nnx.StateAxes({(nnx.BatchStat, 'dropout'): 0, ...: None})

    @nnx.split_rngs(splits=5, only='dropout')
    @nnx.vmap(
        in_axes=(state_axes,),
        out_axes=state_axes,
        graph=True,
        graph_updates=True,
    )
    def create_block(rngs: nnx.Rngs):
      return Block(rngs)

    rngs = nnx.Rngs(params=0, dropout=1)
    module = create_block(rngs)

    assert module.linear.kernel.shape == (2, 3)
    assert module.bn.scale.shape == (3,)
    assert module.bn.mean.shape == (5, 3)

    @nnx.vmap(
        in_axes=(state_axes, 0), out_axes=0, graph=True, graph_updates=True
    )
    def forward_block(module, x):
      return module(x)

    x = jnp.ones((5, 1, 2))
    y = forward_block(module, x)

    assert y.shape == (5, 1, 3)

  @parameterized.parameters(True, False)
  def test_state_axes_simple_functional(self, graph):
    graph_updates = False

    class Block(nnx.Module):

      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    rngs = nnx.Rngs(params=0, dropout=1).split({'dropout': 5})

    vec_filter = (nnx.BatchStat, 'dropout')
    unb_filter = ...

    abs_block = nnx.eval_shape(lambda: Block(nnx.Rngs(params=0, dropout=1)))
    model_axes = nnx.prefix(
        abs_block, {vec_filter: 0, unb_filter: None}, graph=graph
    )

    @nnx.vmap(
        in_axes=(None, 0),
        out_axes=model_axes,
        graph=graph,
        graph_updates=graph_updates,
    )
    def create_block_functional(params, dropout):
      return Block(nnx.Rngs(params=params, dropout=dropout))

    module = create_block_functional(rngs.params, rngs.dropout)

    self.assertEqual(module.linear.kernel.shape, (2, 3))
    self.assertEqual(module.bn.scale.shape, (3,))
    self.assertEqual(module.bn.mean.shape, (5, 3))

    initial_mean = module.bn.mean[...]

    @nnx.vmap(
        in_axes=(model_axes, 0),
        out_axes=0,
        graph=graph,
        graph_updates=graph_updates,
    )
    def forward_block_functional(module, x):
      return module(x)

    x = jnp.ones((5, 1, 2))
    y = forward_block_functional(module, x)

    self.assertEqual(y.shape, (5, 1, 3))
    # Verify that updates were tracked and applied
    self.assertFalse(jnp.allclose(initial_mean, module.bn.mean[...]))

  def test_split_rngs_decorator_simple(self):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, use_running_average=False, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    state_axes = nnx.StateAxes({(nnx.BatchStat, 'dropout'): 0, ...: None})

    @nnx.split_rngs(splits=5, only='dropout', graph=True, graph_updates=True)
    @nnx.vmap(
        in_axes=(state_axes,),
        out_axes=state_axes,
        graph=True,
        graph_updates=True,
    )
    def create_block(rngs: nnx.Rngs):
      return Block(rngs)

    rngs = nnx.Rngs(params=0, dropout=1)

    module = create_block(rngs)

    assert module.linear.kernel.shape == (2, 3)
    assert module.bn.scale.shape == (3,)
    assert module.bn.mean.shape == (5, 3)
    assert module.dropout.rngs is not None
    self.assertEqual(module.dropout.rngs.key.shape, (5,))

    @nnx.vmap(
        in_axes=(state_axes, 0),
        out_axes=0,
        graph=True,
        graph_updates=True,
    )
    def forward_block(module: Block, x):
      assert module.dropout.rngs is not None
      self.assertEqual(module.dropout.rngs.key.shape, ())
      return module(x)

    x = jnp.ones((5, 1, 2))
    y = forward_block(module, x)

    assert module.dropout.rngs is not None
    self.assertEqual(module.dropout.rngs.key.shape, (5,))
    assert y.shape == (5, 1, 3)

  @parameterized.parameters(True, False)
  def test_split_rngs_decorator_simple_functional(self, graph):
    class Block(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, use_running_average=False, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    vec_filter = (nnx.BatchStat, 'dropout')
    unb_filter = ...

    rngs = nnx.Rngs(params=0, dropout=1)
    abs_block = nnx.eval_shape(lambda: Block(nnx.clone(rngs)))
    model_axes = nnx.prefix(
        abs_block, {vec_filter: 0, unb_filter: None}, graph=graph
    )
    rngs_axes = nnx.prefix(rngs, {'dropout': 0, ...: None}, graph=graph)

    @nnx.split_rngs(splits=5, only='dropout')
    @nnx.vmap(
        in_axes=(rngs_axes,),
        out_axes=model_axes,
        graph=graph,
        graph_updates=False,
    )
    def create_block_functional(rngs):
      return Block(rngs)

    module = create_block_functional(rngs)

    self.assertEqual(module.linear.kernel.shape, (2, 3))
    self.assertEqual(module.bn.scale.shape, (3,))
    self.assertEqual(module.bn.mean.shape, (5, 3))
    self.assertIsNotNone(module.dropout.rngs)
    self.assertEqual(module.dropout.rngs.key.shape, (5,))

    @nnx.vmap(
        in_axes=(model_axes, 0),
        out_axes=0,
        graph=graph,
        graph_updates=False,
    )
    def forward_block_functional(module, x):
      self.assertIsNotNone(module.dropout.rngs)
      self.assertEqual(module.dropout.rngs.key.shape, ())
      return module(x)

    x = jnp.ones((5, 1, 2))
    y = forward_block_functional(module, x)

    self.assertIsNotNone(module.dropout.rngs)
    self.assertEqual(module.dropout.rngs.key.shape, (5,))
    self.assertEqual(y.shape, (5, 1, 3))

  @parameterized.parameters(
      (True, True),
      (True, False),
      (False, False),
  )
  def test_state_axes_super_simple(self, graph, graph_updates):
    class Block(nnx.Module):

      def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

      def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    @nnx.split_rngs(splits=5, graph=graph, graph_updates=graph_updates)
    @nnx.vmap(
        in_axes=0,
        out_axes=0,
        graph=graph,
        graph_updates=graph_updates,
    )
    def create_block(rngs: nnx.Rngs):
      return Block(rngs)

    rngs = nnx.Rngs(0)
    module = create_block(rngs)

    self.assertEqual(module.linear.kernel.shape, (5, 2, 3))
    self.assertEqual(module.bn.scale.shape, (5, 3))
    self.assertEqual(module.bn.mean.shape, (5, 3))

    @nnx.vmap(
        in_axes=(0, 0),
        out_axes=0,
        graph=graph,
        graph_updates=graph_updates,
    )
    def forward_block(module, x):
      return module(x)

    x = jnp.ones((5, 1, 2))
    y = forward_block(module, x)

    self.assertEqual(y.shape, (5, 1, 3))















  @parameterized.parameters(
    (True, True), (True, False), (False, False),
  )
  def test_example(self, graph, graph_updates):
    class Model(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(dout, use_running_average=False, rngs=rngs)

      def __call__(self, x):
        return nnx.relu(self.dropout(self.bn(self.linear(x))))

    @nnx.vmap(in_axes=0, out_axes=0, graph=graph, graph_updates=graph_updates)
    def initialize_ensemble(key):
      rngs = nnx.Rngs(key)
      return Model(2, 3, rngs=rngs)

    keys = jax.random.split(jax.random.key(0), 5)
    ensemble = initialize_ensemble(keys)

    self.assertEqual(ensemble.linear.kernel.shape, (5, 2, 3))

    @nnx.vmap(in_axes=(0, None), out_axes=0, graph=graph, graph_updates=graph_updates)
    def forward(model, x):
      return model(x)

    x = jnp.ones((4, 2))
    y = forward(ensemble, x)
    self.assertEqual(y.shape, (5, 4, 3))





  def test_state_axes_from_state(self):
    class Model(nnx.Module):
      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(dout, rngs=rngs)

    model = Model(2, 3, rngs=nnx.Rngs(0))
    state = nnx.state(model)

    state['linear']['kernel'] = 0
    state['linear']['bias'] = 1
    state['bn']['scale'] = 0
    state['bn']['mean'] = 1
    state['bn']['var'] = 0
    state['bn']['bias'] = None

    state_axes = nnx.StateAxes(state)

    self.assertEqual(state_axes.map_prefix(('linear', 'kernel'), None), 0)
    self.assertEqual(state_axes.map_prefix(('linear', 'bias'), None), 1)
    self.assertEqual(state_axes.map_prefix(('bn', 'scale'), None), 0)
    self.assertEqual(state_axes.map_prefix(('bn', 'mean'), None), 1)
    self.assertEqual(state_axes.map_prefix(('bn', 'var'), None), 0)
    self.assertEqual(state_axes.map_prefix(('bn', 'bias'), None), None)

    @nnx.vmap(out_axes=state_axes, axis_size=5, graph=True, graph_updates=True)
    def create_block():
      return Model(2, 3, rngs=nnx.Rngs(0))

    model = create_block()

    self.assertEqual(model.linear.kernel.shape, (5, 2, 3))
    self.assertEqual(model.linear.bias.shape, (3, 5))
    self.assertEqual(model.bn.scale.shape, (5, 3))
    self.assertEqual(model.bn.mean.shape, (3, 5))
    self.assertEqual(model.bn.var.shape, (5, 3))
    self.assertEqual(model.bn.bias.shape, (3,))

  @parameterized.parameters(True, False)
  def test_state_axes_from_state_functional(self, graph):
    class Model(nnx.Module):

      def __init__(self, din, dout, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(dout, rngs=rngs)

    filter_0 = lambda path, var: (
        (path[0] == 'linear' and path[1] == 'kernel')
        or (path[0] == 'bn' and path[1] in ('scale', 'var'))
    )
    filter_1 = lambda path, var: (
        (path[0] == 'linear' and path[1] == 'bias')
        or (path[0] == 'bn' and path[1] == 'mean')
    )

    abs_model = nnx.eval_shape(lambda: Model(2, 3, rngs=nnx.Rngs(0)))
    model_axes = nnx.prefix(
        abs_model, {filter_0: 0, filter_1: 1, ...: None}, graph=graph
    )

    @nnx.vmap(
        out_axes=model_axes,
        axis_size=5,
        graph=graph,
        graph_updates=False,
    )
    def create_block_functional():
      return Model(2, 3, rngs=nnx.Rngs(0))

    model = create_block_functional()

    self.assertEqual(model.linear.kernel.shape, (5, 2, 3))
    self.assertEqual(model.linear.bias.shape, (3, 5))
    self.assertEqual(model.bn.scale.shape, (5, 3))
    self.assertEqual(model.bn.mean.shape, (3, 5))
    self.assertEqual(model.bn.var.shape, (5, 3))
    self.assertEqual(model.bn.bias.shape, (3,))
















