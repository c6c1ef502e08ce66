# Ported from flax 0.12.12 tests/nnx/graph_utils_test.py by tests/peer/port_flax.py: only the
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

import dataclasses
from functools import partial
from threading import Thread
from typing import Any

from absl.testing import absltest, parameterized
import numpy as np
from flax import linen, nnx, struct
import jax
import jax.numpy as jnp
import optax


class StatefulLinear(nnx.Module):
  def __init__(self, din, dout, rngs):
    self.w = nnx.Param(jax.random.uniform(rngs(), (din, dout)))
    self.b = nnx.Param(jnp.zeros((dout,)))
    self.count = nnx.Variable(jnp.array(0, dtype=jnp.uint32))

  def increment(self):
    self.count[...] += 1

  def __call__(self, x):
    self.count[...] += 1
    return x @ self.w + self.b[None]


class TestGraphUtils(parameterized.TestCase):












  @parameterized.parameters(True, False)
  def test_module_list(self, graph):
    rngs = nnx.Rngs(0)
    ls = [
      nnx.Linear(2, 2, rngs=rngs),
      bnjax.nnx.BatchNorm(2, rngs=rngs),
    ]

    graphdef, state = nnx.split(ls, graph=graph)

    assert state[0]['kernel'].shape == (2, 2)
    assert state[0]['bias'].shape == (2,)
    assert state[1]['scale'].shape == (2,)
    assert state[1]['bias'].shape == (2,)
    assert state[1]['mean'].shape == (2,)
    assert state[1]['var'].shape == (2,)








  def test_cached_unflatten(self):
    class Foo(nnx.Module):
      def __init__(self, *, rngs: nnx.Rngs):
        self.a = nnx.Linear(2, 2, rngs=rngs)
        self.b = bnjax.nnx.BatchNorm(2, rngs=rngs)

    def f(m: Foo):
      m.a, m.b = m.b, m.a  # type: ignore

    m = Foo(rngs=nnx.Rngs(0))
    a = m.a
    b = m.b

    ref_out_idx_out = nnx.graphlib.RefMap()
    graphdef: nnx.graphlib.GraphDef[Foo]
    graphdef, state = nnx.graphlib.flatten(m, ref_index=ref_out_idx_out, graph=True)
    state = state.to_nested_state()

    @partial(jax.jit, static_argnums=(0,))
    def f_pure(graphdef: nnx.graphlib.GraphDef[Foo], state):
      idx_out_ref_in = nnx.graphlib.IndexMap()
      m = nnx.graphlib.unflatten(graphdef, state, index_ref=idx_out_ref_in)
      ref_in_idx_out = nnx.graphlib.RefMap.from_indexmap(idx_out_ref_in)
      f(m)
      ref_in_idx_in = nnx.graphlib.RefMap()
      graphdef, state = nnx.graphlib.flatten(
        m, ref_index=ref_in_idx_in, ref_outer_index=ref_in_idx_out, graph=True
      )
      state = state.to_nested_state()
      return state, graphdef

    state, graphdef_out = f_pure(graphdef, state)
    idx_out_ref_out = nnx.graphlib.IndexMap.from_refmap(ref_out_idx_out)
    m2 = nnx.graphlib.unflatten(
      graphdef_out, state, outer_index_outer_ref=idx_out_ref_out
    )
    assert m2 is m
    assert m2.a is b
    assert m2.b is a








































class SimpleModule(nnx.Module):
  pass




class TestTreeFlatten(parameterized.TestCase):



































  def test_prefix_multiple_filters_tree_mode(self):
    class Foo(nnx.Module):

      def __init__(self, rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)

    model = Foo(nnx.Rngs(0))
    result = nnx.prefix(
        model, {nnx.Param: 'params', nnx.BatchStat: 'batch_stats'}, graph=False
    )

    self.assertEqual(result.linear.kernel, 'params')
    self.assertEqual(result.linear.bias, 'params')
    self.assertEqual(result.bn.mean, 'batch_stats')
    self.assertEqual(result.bn.var, 'batch_stats')

  def test_prefix_multiple_filters_graph_mode(self):
    class Foo(nnx.Module):

      def __init__(self, rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)

    model = Foo(nnx.Rngs(0))
    result = nnx.prefix(
        model, {nnx.Param: 'params', nnx.BatchStat: 'batch_stats'}, graph=True
    )

    self.assertIsInstance(result, nnx.extract.TreeState)
    self.assertEqual(result.state['linear']['kernel'], 'params')
    self.assertEqual(result.state['linear']['bias'], 'params')
    self.assertEqual(result.state['bn']['mean'], 'batch_stats')
    self.assertEqual(result.state['bn']['var'], 'batch_stats')





  def test_prefix_callable_per_type_tree_mode(self):
    class Foo(nnx.Module):

      def __init__(self, rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)

    model = Foo(nnx.Rngs(0))

    def prefix_fn(_path, leaf):
      if isinstance(leaf, nnx.BatchStat):
        return 'batch_stats'
      return 'params'

    result = nnx.prefix(model, prefix_fn, graph=False)

    self.assertEqual(result.linear.kernel, 'params')
    self.assertEqual(result.linear.bias, 'params')
    self.assertEqual(result.bn.mean, 'batch_stats')
    self.assertEqual(result.bn.var, 'batch_stats')








class TestUnpack(parameterized.TestCase):



  @parameterized.parameters(True, False)
  def test_unpack_multiple_filters(self, graph):
    class Foo(nnx.Module):
      def __init__(self, rngs):
        self.batch_norm = bnjax.nnx.BatchNorm(2, rngs=rngs)
        self.linear = nnx.Linear(2, 3, rngs=rngs)

    node = Foo(nnx.Rngs(0))
    params, batch_stats = nnx.unpack(node, nnx.Param, nnx.BatchStat, graph=graph)

    self.assertIsInstance(params, nnx.GraphState)
    self.assertIsInstance(batch_stats, nnx.GraphState)
    # Params should contain kernel, bias, scale, bias
    self.assertIn('linear', params)
    self.assertIn('batch_norm', params)
    # Batch stats should contain mean and var
    self.assertIn('batch_norm', batch_stats)
    self.assertIn('mean', batch_stats['batch_norm'])
    self.assertIn('var', batch_stats['batch_norm'])


  @parameterized.parameters(True, False)
  def test_unpack_merge_roundtrip_multiple_filters(self, graph):
    class Foo(nnx.Module):
      def __init__(self, rngs):
        self.batch_norm = bnjax.nnx.BatchNorm(2, rngs=rngs)
        self.linear = nnx.Linear(2, 3, rngs=rngs)

    node = Foo(nnx.Rngs(0))
    kernel_before = node.linear.kernel[...]

    params, batch_stats = nnx.unpack(node, nnx.Param, nnx.BatchStat, graph=graph)
    new_node = nnx.merge(params, batch_stats)

    self.assertIsInstance(new_node, Foo)
    self.assertIsInstance(new_node.linear, nnx.Linear)
    self.assertIsInstance(new_node.batch_norm, bnjax.nnx.BatchNorm)
    np.testing.assert_array_equal(new_node.linear.kernel[...], kernel_before)

  @parameterized.parameters(True, False)
  def test_unpack_merge_roundtrip_with_rest(self, graph):
    class Foo(nnx.Module):
      def __init__(self, rngs):
        self.batch_norm = bnjax.nnx.BatchNorm(2, rngs=rngs)
        self.linear = nnx.Linear(2, 3, rngs=rngs)

    node = Foo(nnx.Rngs(0))
    params, rest = nnx.unpack(node, nnx.Param, ..., graph=graph)
    new_node = nnx.merge(params, rest)

    self.assertIsInstance(new_node, Foo)
    self.assertIsInstance(new_node.linear, nnx.Linear)
    self.assertIsInstance(new_node.batch_norm, bnjax.nnx.BatchNorm)


  def test_unpack_state_graphdefs_shared(self):
    class Foo(nnx.Module):
      def __init__(self, rngs):
        self.batch_norm = bnjax.nnx.BatchNorm(2, rngs=rngs)
        self.linear = nnx.Linear(2, 3, rngs=rngs)

    node = Foo(nnx.Rngs(0))
    params, batch_stats = nnx.unpack(node, nnx.Param, nnx.BatchStat)

    # Both GraphState objects should have the same graphdef
    self.assertEqual(params._graphdef, batch_stats._graphdef)

  def test_unpack_with_nnx_grad_and_optimizer(self):
    class Foo(nnx.Module):
      def __init__(self, rngs):
        self.batch_norm = bnjax.nnx.BatchNorm(2, rngs=rngs)
        self.linear = nnx.Linear(2, 3, rngs=rngs)

      def __call__(self, x):
        return self.linear(self.batch_norm(x))

    x = jnp.ones((5, 2))
    y = jnp.ones((5, 3))
    model = Foo(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    params, rest = nnx.unpack(model, nnx.Param, ...)

    def loss_fn(params, rest):
      model = nnx.merge(params, rest)
      return jnp.mean((model(x) - y) ** 2)

    grads = nnx.grad(loss_fn, graph=False)(params, rest)
    optimizer.update(model, grads)

    self.assertIsInstance(grads, nnx.GraphState)
    self.assertIsInstance(grads._state, nnx.State)
    self.assertIn('linear', grads)
    self.assertIn('kernel', grads['linear'])


  def test_merge_different_graphdefs_error(self):
    model1 = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    model2 = bnjax.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    state1 = nnx.unpack(model1)
    state2 = nnx.unpack(model2)

    with self.assertRaisesRegex(ValueError, 'GraphDef must be the same'):
      nnx.merge(state1, state2)





