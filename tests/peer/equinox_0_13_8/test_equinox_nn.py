"""equinox 0.13.8's own BatchNorm tests, with the class swapped.

Ported by hand from equinox's tests/test_nn.py (test_sequential,
test_nested_sequential, test_batch_norm, test_batch_norm_zero_training_steps),
tests/test_stateful.py (test_delete_init_state) and tests/test_serialisation.py
(test_stateful), under equinox's own test configuration (strict dtype
promotion, rank promotion raises). `eqx.nn.BatchNorm` is
`bnjax.equinox.BatchNorm`; every other line is equinox's, except these
edits, each marked `# bnjax:` where it is made:

1. `mode="ema"` is refused by bnjax (it normalizes training batches by a
   running average: equinox#659), so `test_batch_norm[ema]` is a listed
   deliberate difference (tests/peer/conftest.py), and the tests that use
   `mode="ema"` only to build a stateful layer use `mode="batch"`.
2. The state lives in one `bn.state_index` (a bnjax.BatchStats), where
   equinox has `ema_state_index`/`batch_state_index` and counters.
3. `test_delete_init_state` counts 2 state arrays (mean, var), not
   equinox's 3 (mean, var and a first-time flag).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jrandom
import pytest

from bnjax.equinox import BatchNorm


@pytest.fixture(autouse=True)
def _equinox_test_config():
  # equinox's tests/conftest.py sets these globally; here only for the port.
  with jax.numpy_dtype_promotion('strict'), jax.numpy_rank_promotion('raise'):
    yield


@pytest.fixture
def getkey():
  import equinox.internal as eqxi
  return eqxi.GetKey()


def test_sequential(getkey):
    seq = eqx.nn.Sequential(
        [
            eqx.nn.Linear(2, 4, key=getkey()),
            eqx.nn.Linear(4, 1, key=getkey()),
            BatchNorm(1, axis_name="batch", mode="batch"),  # bnjax: edit 1
            eqx.nn.Linear(1, 3, key=getkey()),
        ]
    )
    x = jrandom.normal(getkey(), (1, 2))
    batch_seq = jax.vmap(seq, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    state = eqx.nn.State(seq)

    output, state = batch_seq(x, state)
    assert output[0].shape == (3,)
    # Test indexing
    assert isinstance(seq[0], eqx.nn.Linear)
    assert isinstance(seq[1:], eqx.nn.Sequential)

    x = jrandom.normal(getkey(), (1, 4))
    batch_seq = jax.vmap(
        seq[1:],
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )
    output, state = batch_seq(x, state)
    assert output[0].shape == (3,)
    assert len(seq) == 4
    assert eqx.nn.Sequential(list(seq)) == seq


@pytest.mark.parametrize("inner_stateful", (False, True))
@pytest.mark.parametrize("outer_stateful", (False, True))
def test_nested_sequential(inner_stateful, outer_stateful, getkey):
    def make():
        inner_seq = eqx.nn.Sequential(
            [
                eqx.nn.Linear(2, 4, key=getkey()),
                BatchNorm(4, axis_name="batch", mode="batch")  # bnjax: edit 1
                if inner_stateful
                else eqx.nn.Identity(),
                eqx.nn.Linear(4, 3, key=getkey()),
            ]
        )
        outer_seq = eqx.nn.Sequential(
            [
                eqx.nn.Linear(5, 2, key=getkey()),
                inner_seq,
                BatchNorm(3, axis_name="batch", mode="batch")  # bnjax: edit 1
                if outer_stateful
                else eqx.nn.Identity(),
                eqx.nn.Linear(3, 6, key=getkey()),
            ]
        )
        return outer_seq

    x = jrandom.normal(getkey(), (1, 5))
    if inner_stateful or outer_stateful:
        model, state = eqx.nn.make_with_state(make)()
        out, state = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)
        assert isinstance(state, eqx.nn.State)
    else:
        model = make()
        out = jax.vmap(model, axis_name="batch")(x)
    assert isinstance(out, jax.Array)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_batch_norm(getkey, mode):
    x0 = jrandom.uniform(getkey(), (5,))
    x1 = jrandom.uniform(getkey(), (10, 5))
    x2 = jrandom.uniform(getkey(), (10, 5, 6))
    x3 = jrandom.uniform(getkey(), (10, 5, 7, 8))

    # Test that it works with a single vmap'd axis_name

    bn = BatchNorm(5, "batch", mode=mode)
    state = eqx.nn.State(bn)
    vbn = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))

    for x in (x1, x2, x3):
        out, state = vbn(x, state)
        assert out.shape == x.shape
        running_mean, running_var = state.get(bn.state_index)  # bnjax: edit 2
        assert running_mean.shape == (5,)
        assert running_var.shape == (5,)

    # Test that it fails without any vmap'd axis_name

    with pytest.raises(NameError):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x1, state)
    state = eqx.nn.State(bn)

    with pytest.raises(NameError):
        bn(x0, state)
    state = eqx.nn.State(bn)

    # Test that it vmaps with other vmaps without axis_name

    out, state = jax.vmap(
        jax.vmap(bn, axis_name="batch", in_axes=(1, None), out_axes=(1, None)),
        in_axes=(0, None),
    )(x2, state)
    assert out.shape == x2.shape
    running_mean, running_var = state.get(bn.state_index)  # bnjax: edit 2
    assert running_mean.shape == (10, 5)
    assert running_var.shape == (10, 5)

    # Test that it handles multiple axis_names

    vvbn = BatchNorm(6, ("batch1", "batch2"), mode=mode)
    vvstate = eqx.nn.State(vvbn)
    for axis_name in ("batch1", "batch2"):
        vvbn = jax.vmap(
            vvbn, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None)
        )
    out, out_vvstate = vvbn(x2, vvstate)
    assert out.shape == x2.shape
    running_mean, running_var = out_vvstate.get(vvbn.state_index)  # bnjax: edit 2
    assert running_mean.shape == (6,)
    assert running_var.shape == (6,)

    # Test that it normalises

    x1alt = jrandom.normal(jrandom.PRNGKey(5678), (10, 5))  # avoid flakey test
    bn = BatchNorm(5, "batch", channelwise_affine=False, mode=mode)
    state = eqx.nn.State(bn)
    vbn = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    out, state = vbn(x1alt, state)
    true_out = (x1alt - jnp.mean(x1alt, axis=0, keepdims=True)) / jnp.sqrt(
        jnp.var(x1alt, axis=0, keepdims=True) + 1e-5
    )
    assert jnp.allclose(out, true_out)

    # Test that the statistics update during training
    out, state = vbn(x1, state)
    running_mean, running_var = state.get(bn.state_index)  # bnjax: edit 2
    out, state = vbn(3 * x1 + 10, state)
    running_mean2, running_var2 = state.get(bn.state_index)  # bnjax: edit 2
    assert not jnp.allclose(running_mean, running_mean2)
    assert not jnp.allclose(running_var, running_var2)

    # Test that the statistics don't update at inference

    ibn = eqx.nn.inference_mode(bn, value=True)
    vibn = jax.vmap(ibn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    out, state = vibn(4 * x1 + 20, state)
    running_mean3, running_var3 = state.get(bn.state_index)  # bnjax: edit 2
    assert jnp.array_equal(running_mean2, running_mean3)
    assert jnp.array_equal(running_var2, running_var3)

    # Test that we can differentiate through it

    @jax.grad
    def f(x):
        out, _ = vbn(x, state)
        return jnp.sum(out)

    f(jrandom.normal(getkey(), (1, 5)))


# https://github.com/patrick-kidger/equinox/issues/1010
def test_batch_norm_zero_training_steps(getkey):
    bn, state = eqx.nn.make_with_state(BatchNorm)(
        input_size=3, axis_name="foo", mode="batch", inference=True
    )
    x = jrandom.normal(getkey(), (5, 3))
    out, _ = jax.vmap(bn, in_axes=(0, None), axis_name="foo")(x, state)
    assert jnp.allclose(x, out)


# tests/test_stateful.py
def test_delete_init_state():
    model = BatchNorm(3, "batch", mode="batch")  # bnjax: edit 1
    eqx.nn.State(model)
    model2 = eqx.nn.delete_init_state(model)

    eqx.nn.State(model)
    with pytest.raises(ValueError):
        eqx.nn.State(model2)

    leaves = [x for x in jax.tree_util.tree_leaves(model) if eqx.is_array(x)]
    leaves2 = [x for x in jax.tree_util.tree_leaves(model2) if eqx.is_array(x)]
    assert len(leaves) == len(leaves2) + 2  # bnjax: edit 3


# tests/test_serialisation.py
def test_stateful(tmp_path):
    class Model(eqx.Module):
        norm1: BatchNorm
        norm2: BatchNorm

    model = Model(
        BatchNorm(3, "hi", mode="batch"), BatchNorm(4, "bye", mode="batch")  # bnjax: edit 1
    )
    state = eqx.nn.State(model)

    eqx.tree_serialise_leaves(tmp_path, (model, state))

    model2 = Model(
        BatchNorm(3, "hi", mode="batch"), BatchNorm(4, "bye", mode="batch")  # bnjax: edit 1
    )
    state2 = eqx.nn.State(model2)

    eqx.tree_deserialise_leaves(tmp_path, (model2, state2))
