r"""Haiku <-> bnjax/Flax conversion of ``hk.BatchNorm`` state (via interop).

An ``hk.BatchNorm`` named ``name`` keeps ``params[name]`` = ``{scale,
offset}`` (shaped to broadcast with x, e.g. ``(1, 1, 1, C)``) and two
zero-debiased EMAs, ``state[name + '/~/mean_ema']`` and ``'/~/var_ema'``,
each ``{counter, hidden, average}``: ``hidden`` starts at 0 and takes
``hidden = d * hidden + (1 - d) * value`` per step, and ``average = hidden /
(1 - d**counter)`` is what inference uses (the biased variance). That is
exactly :class:`bnjax.DebiasedStats` with ``weight = 1 - d**counter``.
Haiku keeps both in the input's dtype (bfloat16 input, bfloat16 EMAs:
haiku#396); the conversion reads them into float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from bnjax._types import BatchStats, DebiasedStats

_MEAN, _VAR = '/~/mean_ema', '/~/var_ema'
# to_haiku's counter: d**counter underflows to 0 for any decay < 1 - 1e-9,
# so haiku's debiasing divides by 1: the imported statistics continue as a
# converged EMA (Flax's rule), not as the first few batches.
_CONVERGED = 2**30


def _layers(fn, state):
  names = sorted(k[: -len(_MEAN)] for k in state if k.endswith(_MEAN))
  if not names:
    raise ValueError(
      f'{fn}: state has no hk.BatchNorm statistics (no "<name>{_MEAN}" '
      f'entry); pass the state of hk.transform_with_state, got keys '
      f'{sorted(state)[:5]}'
    )
  return names


def from_haiku(
  params: Mapping[str, Any],
  state: Mapping[str, Any],
  *,
  decay_rate: float | None = None,
) -> dict[str, dict[str, Any]]:
  r"""Every ``hk.BatchNorm`` of a Haiku model, as Flax-named arrays.

  Args:
    params: the Haiku params (``hk.transform_with_state``'s).
    state: the Haiku state.
    decay_rate: the layers' ``decay_rate``; given, each layer's ``'stats'``
      is a :class:`bnjax.DebiasedStats` that continues Haiku's debiased EMA
      exactly (train it with ``momentum=decay_rate``).

  Returns:
    ``{haiku module name: {'scale', 'bias', 'mean', 'var'[, 'stats']}}``:
    float32 vectors of shape ``(C,)``; ``mean`` and ``var`` are Haiku's
    debiased averages (what its inference uses), for a Flax ``batch_stats``
    collection or a :class:`bnjax.BatchStats`. ``scale``/``bias`` are absent
    where the layer has none.

  Example:
    >>> import numpy as np
    >>> from bnjax import interop
    >>> params = {'bn': {'scale': np.full((1, 2), 2.0),
    ...                  'offset': np.zeros((1, 2))}}
    >>> ema = lambda v: {'counter': np.array(1), 'hidden': 0.1 * v,
    ...                  'average': v}
    >>> state = {'bn/~/mean_ema': ema(np.ones((1, 2))),
    ...          'bn/~/var_ema': ema(np.full((1, 2), 4.0))}
    >>> layer = interop.from_haiku(params, state, decay_rate=0.9)['bn']
    >>> layer['var'], layer['stats'].weight.round(2)
    (Array([4., 4.], dtype=float32), Array([0.1, 0.1], dtype=float32))
  """
  fn = 'bnjax.interop.from_haiku'
  out = {}
  for name in _layers(fn, state):
    mean_ema, var_ema = state[name + _MEAN], state[name + _VAR]
    vec = lambda v: jnp.asarray(np.asarray(v, np.float32).reshape(-1))
    layer: dict[str, Any] = {
      'mean': vec(mean_ema['average']),
      'var': vec(var_ema['average']),
    }
    p = params.get(name, {})
    if 'scale' in p:
      layer['scale'] = vec(p['scale'])
    if 'offset' in p:
      layer['bias'] = vec(p['offset'])
    if decay_rate is not None:
      if not 0.0 <= decay_rate < 1.0:
        raise ValueError(
          f'{fn}: decay_rate={decay_rate} must be in [0, 1), the '
          "hk.BatchNorm's decay_rate"
        )
      counter = int(np.asarray(mean_ema['counter']))
      weight = 1.0 - np.float64(decay_rate) ** counter
      layer['stats'] = DebiasedStats(
        vec(mean_ema['hidden']),
        vec(var_ema['hidden']),
        jnp.full(layer['mean'].shape, weight, jnp.float32),
      )
    out[name] = layer
  return out


def to_haiku(
  layers: Mapping[str, Mapping[str, Any]],
  params: Mapping[str, Any],
  state: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Writes bnjax/Flax BatchNorm arrays into a Haiku model's params and state.

  Args:
    layers: ``{haiku module name: {'mean', 'var'[, 'scale', 'bias']}}``
      (:func:`from_haiku`'s layout; ``mean``/``var`` may come from a Flax
      ``batch_stats`` collection or :func:`bnjax.population_stats`).
    params: the Haiku model's params (from its ``init``): the template whose
      shapes and dtypes are kept.
    state: the Haiku model's state (from its ``init``), likewise.

  Returns:
    ``(params, state)``, new dicts. Each EMA's ``average`` and ``hidden`` is
    the given statistic and its ``counter`` is large, so Haiku's inference
    uses the statistics as they are and further training continues them as
    a converged EMA.

  Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from bnjax import interop
    >>> params = {'bn': {'scale': np.ones((1, 2)), 'offset': np.zeros((1, 2))}}
    >>> ema = {'counter': np.array(0), 'hidden': np.zeros((1, 2)),
    ...        'average': np.zeros((1, 2))}
    >>> state = {'bn/~/mean_ema': ema, 'bn/~/var_ema': ema}
    >>> layers = {'bn': {'mean': jnp.array([1.0, 2.0]),
    ...                  'var': jnp.array([3.0, 4.0])}}
    >>> _, new = interop.to_haiku(layers, params, state)
    >>> new['bn/~/var_ema']['average']
    array([[3., 4.]])
  """
  fn = 'bnjax.interop.to_haiku'
  known = _layers(fn, state)
  params = {k: dict(v) for k, v in params.items()}
  state = {k: dict(v) for k, v in state.items()}
  for name, layer in layers.items():
    if name not in known:
      raise ValueError(
        f'{fn}: {name!r} is not an hk.BatchNorm of this model; its layers '
        f'are {known}'
      )
    if isinstance(layer, BatchStats):
      layer = layer._asdict()
    for key, ema in (('mean', _MEAN), ('var', _VAR)):
      old = state[name + ema]
      value = _shaped(fn, layer[key], old['average'], f'{name}.{key}')
      state[name + ema] = {
        'counter': np.asarray(_CONVERGED, np.asarray(old['counter']).dtype),
        'hidden': value,
        'average': value,
      }
    for key, hk_key in (('scale', 'scale'), ('bias', 'offset')):
      if key in layer:
        params[name][hk_key] = _shaped(
          fn, layer[key], params[name][hk_key], f'{name}.{key}'
        )
  return params, state


def _shaped(fn, value, like, what):
  like = np.asarray(like)
  value = np.asarray(value, np.float32)
  if value.size != like.size:
    raise ValueError(
      f'{fn}: {what} has {value.size} values, but the Haiku layer has '
      f'{like.size} (shape {like.shape}); pass the layer with as many '
      'channels'
    )
  return value.reshape(like.shape).astype(like.dtype)
