"""Which nnx layers a training helper acts on: the model check and the
``only=`` filter that set_mode and the pooling helpers share."""

from __future__ import annotations

from typing import Any

from flax import nnx

from bnjax import nnx as bnnx

# The nnx BatchNorm layers the training helpers act on: bnjax's and flax's.
NNX_LAYERS = (bnnx.BatchNorm, bnnx.BatchRenorm, nnx.BatchNorm)


def check_model(fn: str, model: Any) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f'{fn}: model must be an nnx.Module, got {type(model).__name__}; for '
      'linen, see bnjax.training.mode_fields and bnjax.linen.apply_pooled'
    )


def pick_layers(fn: str, model: Any, only: Any, types: tuple) -> list:
  """The layers of ``types`` in ``model`` that ``only`` picks (>= 1)."""
  check_model(fn, model)
  pick = (lambda path, m: True) if only is None else predicate(fn, only)
  found = [
    m
    for path, m in nnx.iter_modules(model)
    if isinstance(m, types) and pick(path, m)
  ]
  if not found:
    raise ValueError(
      f'{fn}: the model has no BatchNorm layer'
      + ('' if only is None else f' selected by only={only!r}')
    )
  return found


def predicate(fn: str, only: Any):
  """nnx's predicate of the Filter ``only``; anything else is refused here,
  not inside flax (which fails formatting its own message on an int)."""
  try:
    return nnx.filterlib.to_predicate(only)
  except Exception:  # flax raises TypeError or ValueError, by version
    raise TypeError(
      f'{fn}: only must be an nnx Filter (a callable (path, module) -> '
      "bool, a type, a path string such as 'backbone', or a tuple of "
      f'them), got {only!r:.60} of type {type(only).__name__}'
    ) from None
