# Ported from flax 0.12.12 tests/nnx/helpers_test.py by tests/peer/port_flax.py: only the
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

import collections.abc
from absl.testing import absltest
from flax import linen
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax


class TrainState(nnx.TrainState):
  batch_stats: nnx.State


class TestHelpers(absltest.TestCase):

  def test_train_state_methods(self):
    class Foo(nnx.Module):
      def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 4, rngs=rngs)
        self.batch_norm = bnjax.nnx.BatchNorm(4, rngs=rngs)

      def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = self.linear(x)
        x = self.batch_norm(x, use_running_average=not train)
        return x

    module = Foo(rngs=nnx.Rngs(0))
    graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)

    state = TrainState.create(
      graphdef,
      params=params,
      tx=optax.sgd(1.0),
      batch_stats=batch_stats,
    )

    x = jax.numpy.ones((1, 2))
    y, _updates = state.apply('params', 'batch_stats')(x, train=True)

    assert y.shape == (1, 4)

    # fake gradient
    grads = jax.tree.map(jnp.ones_like, state.params)
    # test apply_gradients
    state = state.apply_gradients(grads)















  def test_sequential_heterogeneous_kwargs_forwarding(self):
    rngs = nnx.Rngs(params=0)
    l1 = nnx.Linear(4, 4, rngs=rngs)
    bn = bnjax.nnx.BatchNorm(4, rngs=rngs)
    drop = nnx.Dropout(rate=0.5)
    l2 = nnx.Linear(4, 2, rngs=rngs)

    seq = nnx.Sequential(l1, bn, nnx.relu, drop, l2)
    x = jnp.ones((3, 4))

    # Eval call: BatchNorm receives use_running_average=True, Dropout receives
    # deterministic=True, while Linear and relu ignore both kwargs cleanly.
    mean_before = bn.mean[...].copy()
    y_eval_1 = seq(x, use_running_average=True, deterministic=True)
    y_eval_2 = seq(x, use_running_average=True, deterministic=True)
    np.testing.assert_allclose(y_eval_1, y_eval_2)
    np.testing.assert_array_equal(bn.mean[...], mean_before)

    # Train call with explicit call-time rngs (Dropout has no init-time rngs):
    # BatchNorm updates stats and Dropout uses the forwarded call-time rngs.
    y_train_1 = seq(
        x,
        use_running_average=False,
        deterministic=False,
        rngs=nnx.Rngs(dropout=42),
    )
    y_train_2 = seq(
        x,
        use_running_average=True,
        deterministic=False,
        rngs=nnx.Rngs(dropout=42),
    )
    self.assertEqual(y_train_1.shape, (3, 2))
    self.assertFalse(jnp.array_equal(bn.mean[...], mean_before))
    self.assertFalse(jnp.allclose(y_train_2, y_eval_1))

    # Layers with **kwargs receive all shared kwargs; dict/tuple chaining still
    # works alongside shared sideband kwargs.
    seen_kwargs = []

    def dict_producer(h, *, scale=1.0):
      return {'a': h * scale, 'b': jnp.ones_like(h)}

    def dict_consumer(a, b, **extra):
      seen_kwargs.append(extra)
      return a + b

    chained = nnx.Sequential(l1, dict_producer, dict_consumer)
    out = chained(x, scale=2.0, tag='meta')
    np.testing.assert_allclose(out, l1(x) * 2.0 + 1.0)
    self.assertEqual(seen_kwargs, [{'scale': 2.0, 'tag': 'meta'}])

    # Passing Layer 0's input by keyword does not collide on Layer 1.
    two_linears = nnx.Sequential(l1, l2)
    np.testing.assert_allclose(two_linears(inputs=x), l2(l1(x)))

  def test_sequential_unused_and_conflicting_kwargs(self):
    rngs = nnx.Rngs(0)
    lin_seq = nnx.Sequential(
        nnx.Linear(4, 4, rngs=rngs),
        nnx.relu,
        nnx.Linear(4, 2, rngs=rngs),
    )
    x = jnp.ones((2, 4))

    # Unused kwargs (e.g. deterministic / use_running_average / rngs when
    # optional Dropout or BatchNorm layers are omitted) are ignored cleanly.
    out = lin_seq(
        x,
        deterministic=True,
        use_running_average=True,
        rngs=nnx.Rngs(dropout=0),
    )
    np.testing.assert_allclose(out, lin_seq(x))

    # Collision between a returned dict key and an accepted call kwarg raises
    # TypeError rather than silently shadowing either value.
    def dict_out(h):
      return {'a': h, 'scale': 3.0}

    def consumer(a, *, scale=1.0):
      return a * scale

    conflict_seq = nnx.Sequential(dict_out, consumer)
    with self.assertRaisesRegex(
        TypeError, r'Got multiple values for arguments .* in Sequential\[1\]'
    ):
      conflict_seq(x, scale=2.0)

    # Unaccepted keys in a returned dict still raise TypeError on the consumer.
    def bad_dict_out(h):
      return {'a': h, 'unexpected_key': 1.0}

    bad_seq = nnx.Sequential(bad_dict_out, consumer)
    with self.assertRaisesRegex(
        TypeError, "unexpected keyword argument 'unexpected_key'"
    ):
      bad_seq(x)



