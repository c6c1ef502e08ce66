"""One jitted, vmapped train loop shared by the experiments.

Runs are (seed, learning rate) pairs trained side by side under ``jax.vmap``:
each has its own initialization and batch order (from its seed) and its own
learning rate (``optax.inject_hyperparams``). Steps between evaluations run
in one ``lax.scan``. Models take ``(x, train)``; BN layers keep their
running statistics in the ``batch_stats`` collection and are evaluated with
them (``train=False``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm


@dataclasses.dataclass
class Setup:
  model: object
  data: tuple
  steps: int
  batch: int
  eval_every: int
  optimizer: Callable = optax.sgd
  sampler: Callable | None = None  # (np rng, steps, batch, y) -> (steps, batch)
  probe: Callable | None = None  # (variables, x_eval) -> array, per eval
  eval_train_n: int = 1000


def epoch_sampler(rng, steps, batch, y):
  """Batches without replacement within an epoch, reshuffled every epoch."""
  n = len(y)
  per = n // batch
  idx = [
    rng.permutation(n)[: per * batch].reshape(per, batch)
    for _ in range(-(-steps // per))
  ]
  return np.concatenate(idx)[:steps]


def warmup_sgd(warmup_steps: int, momentum: float = 0.9):
  """SGD with momentum whose step ramps linearly from 0 over the first
  ``warmup_steps`` (Goyal et al. 2017's warm-up for the linear scaling rule).
  The learning rate stays a hyperparameter ``inject_hyperparams`` can set."""

  def make(learning_rate):
    ramp = lambda count: jnp.minimum(1.0, (count + 1) / warmup_steps)
    return optax.chain(
      optax.sgd(learning_rate, momentum=momentum), optax.scale_by_schedule(ramp)
    )

  return make


def xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _split(variables):
  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}
  return params, state


def run(setup: Setup, seeds, lrs, desc: str = '', init_scales=None) -> dict:
  """Trains len(lrs) x len(seeds) runs; returns arrays (lr, seed, eval).

  ``init_scales``, if given, pairs with ``lrs``: run i multiplies every
  initial Dense/Conv kernel by ``init_scales[i]``.
  """
  (xtr, ytr), (xte, yte) = setup.data
  model = setup.model
  scales = [1.0] * len(lrs) if init_scales is None else list(init_scales)
  runs = [
    (s, lr, sc) for lr, sc in zip(lrs, scales, strict=True) for s in seeds
  ]
  keys = jnp.stack([jax.random.key(s) for s, _, _ in runs])
  lr_arr = jnp.asarray([lr for _, lr, _ in runs], jnp.float32)
  sc_arr = jnp.asarray([sc for _, _, sc in runs], jnp.float32)
  sampler = setup.sampler or epoch_sampler
  idx = np.stack(
    [
      sampler(np.random.default_rng(1000 + s), setup.steps, setup.batch, ytr)
      for s, _, _ in runs
    ]
  )
  tx = optax.inject_hyperparams(setup.optimizer)(learning_rate=0.0)
  xtr_j, ytr_j = jnp.asarray(xtr), jnp.asarray(ytr)
  xte_j, yte_j = jnp.asarray(xte), jnp.asarray(yte)

  def init(key, lr, scale):
    params, state = _split(model.init(key, xtr_j[: setup.batch], train=False))
    params = jax.tree_util.tree_map_with_path(
      lambda p, a: a * scale if 'kernel' in jax.tree_util.keystr(p) else a,
      params,
    )
    opt = tx.init(params)
    opt.hyperparams['learning_rate'] = lr
    return params, state, opt

  def loss_fn(params, state, xb, yb, key):
    out, new = model.apply(
      {'params': params, **state},
      xb,
      train=True,
      mutable=list(state),
      rngs={'noise': key},
    )
    return xent(out, yb), new

  def step(carry, inp):
    params, state, opt, key = carry
    ib = inp
    key, sub = jax.random.split(key)
    (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(
      params, state, xtr_j[ib], ytr_j[ib], sub
    )
    upd, opt = tx.update(g, opt, params)
    return (optax.apply_updates(params, upd), {**state, **new}, opt, key), loss

  def evaluate(params, state):
    v = {'params': params, **state}
    lo = model.apply(v, xte_j, train=False)
    lt = model.apply(v, xtr_j[: setup.eval_train_n], train=False)
    m = dict(
      test_acc=jnp.mean(jnp.argmax(lo, -1) == yte_j),
      test_loss=xent(lo, yte_j),
      train_acc=jnp.mean(jnp.argmax(lt, -1) == ytr_j[: setup.eval_train_n]),
    )
    if setup.probe is not None:
      m['probe'] = setup.probe(v, xte_j)
    return m

  @jax.jit
  @jax.vmap
  def chunk(carry, ib):
    carry, losses = jax.lax.scan(step, carry, ib)
    return carry, losses, evaluate(carry[0], carry[1])

  params, state, opt = jax.jit(jax.vmap(init))(keys, lr_arr, sc_arr)
  carry = (
    params,
    state,
    opt,
    jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys),
  )
  hist = {'step': [], 'train_loss': []}
  n_eval = setup.steps // setup.eval_every
  for e in tqdm(range(n_eval), desc=desc or 'train', leave=False, disable=None):
    sl = slice(e * setup.eval_every, (e + 1) * setup.eval_every)
    carry, losses, m = chunk(carry, jnp.asarray(idx[:, sl]))
    hist['step'].append((e + 1) * setup.eval_every)
    hist['train_loss'].append(np.asarray(jnp.mean(losses, -1)))
    for k, v in m.items():
      hist.setdefault(k, []).append(np.asarray(v))
  shape = (len(lrs), len(seeds))
  out = {'step': np.asarray(hist.pop('step'))}
  for k, v in hist.items():
    a = np.stack(v, 1)  # (runs, evals, ...)
    out[k] = a.reshape(shape + a.shape[1:])
  out['final_state'] = carry
  return out
