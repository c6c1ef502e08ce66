"""The fields and constructor checks of ``bnjax.equinox``'s layers.

:class:`Layer` is their base: the fields every layer has, checked once at
construction, and what :mod:`bnjax._equinox_torch` reads. The call is
``bnjax.equinox``'s.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from bnjax import _checks, _moments

NOT_STATE = (
  '{fn}: state must be an eqx.nn.State (from eqx.nn.make_with_state), got {got}'
)
NOT_PLACED = (
  '{fn}: x is sharded over the mesh axes {axes} (a jit over NamedSharding '
  'inputs), but the eqx.nn.State is not placed on that mesh, and '
  'State.set refuses statistics whose type gains a mesh; place the state '
  'on it first, replicated: state = jax.device_put(state, '
  'NamedSharding(mesh, P()))'
)
EMA_MODE = (
  '{fn}: mode="{mode}" normalizes training batches by a running average '
  '(equinox\'s default "legacy" is its "ema"), which gives gradient '
  'spikes (equinox#659); bnjax always normalizes by the batch statistics '
  'and keeps an EMA for inference. Pass mode="batch" (or leave it out); '
  'for the debiased running statistics of equinox\'s mode="batch" pass '
  'debias=True'
)


def _mesh_names(v) -> tuple:
  mesh = getattr(getattr(jax.typeof(v), 'sharding', None), 'mesh', None)
  return tuple(getattr(mesh, 'axis_names', ()))


def set_state(fn: str, state, index, old, new):
  """``state.set(index, new)``. eqx.nn.State.set refuses a value whose type
  differs from the old one, sharding included, with a message that prints
  the two as equal: where the cause is a state left off the mesh of a
  sharded batch, say so and name the fix."""
  try:
    return state.set(index, new)
  except ValueError as e:
    if _mesh_names(new.mean) and not _mesh_names(old.mean):
      raise ValueError(
        NOT_PLACED.format(fn=fn, axes=_mesh_names(new.mean))
      ) from e
    raise


def check_state(fn: str, state: Any) -> None:
  """An ``eqx.nn.State``."""
  if not isinstance(state, eqx.nn.State):
    raise TypeError(NOT_STATE.format(fn=fn, got=type(state).__name__))


def check_mode(fn: str, mode: Any) -> None:
  """equinox's ``mode``: only ``"batch"`` (see :mod:`bnjax.equinox`)."""
  if mode in ('ema', 'legacy'):
    raise ValueError(EMA_MODE.format(fn=fn, mode=mode))
  if mode != 'batch':
    raise ValueError(f'{fn}: mode must be "batch", got {mode!r}')


class Layer(eqx.nn.StatefulLayer):
  """The fields of ``bnjax.equinox``'s layers, checked at construction."""

  weight: jax.Array | None
  bias: jax.Array | None
  state_index: eqx.nn.StateIndex
  inference: bool
  axis_name: Hashable | Sequence[Hashable] | None = eqx.field(static=True)
  input_size: int = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  momentum: float = eqx.field(static=True)
  batch_axis: int | None = eqx.field(static=True)
  sync: str = eqx.field(static=True)

  def _setup(self, fn, input_size, dtype, init_state, **fields):
    if not _checks.is_int(input_size, at_least=1):
      raise TypeError(
        f'{fn}: input_size must be a positive int (the number of channels), '
        f'got {input_size!r}'
      )
    batch_axis = fields['batch_axis']
    if batch_axis is not None and not _checks.is_int(batch_axis):
      raise TypeError(
        f'{fn}: batch_axis must be None (per-example calls inside '
        f'jax.vmap) or an int (the batch axis of x), got {batch_axis!r}'
      )
    _checks.check_flag(fn, 'inference', fields['inference'])
    _checks.check_flag(fn, 'channelwise_affine', fields['channelwise_affine'])
    _checks.check_epsilon(fn, fields['eps'], name='eps')
    _checks.check_momentum(fn, fields['momentum'])
    _moments.check_mode(fn, fields['sync'])
    dtype = _checks.float_dtype(
      fn, 'dtype', jnp.float32 if dtype is None else dtype, 'weight and bias'
    )
    if fields['channelwise_affine']:
      self.weight = jnp.ones((input_size,), dtype)
      self.bias = jnp.zeros((input_size,), dtype)
    else:
      self.weight = self.bias = None
    self.state_index = eqx.nn.StateIndex(init_state(input_size))
    self.input_size = int(input_size)  # a NumPy int is no static field
    if batch_axis is not None:
      fields['batch_axis'] = int(batch_axis)
    for name, value in fields.items():
      setattr(self, name, value)
