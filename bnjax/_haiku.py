r"""Haiku <-> bnjax/Flax conversion of ``hk.BatchNorm`` state (via interop).

An ``hk.BatchNorm`` named ``name`` keeps ``params[name]`` = ``{scale,
offset}`` (shaped to broadcast with x, e.g. ``(1, 1, 1, C)``) and two
zero-debiased EMAs, ``state[name + '/~/mean_ema']`` and ``'/~/var_ema'``,
each ``{counter, hidden, average}``: ``hidden`` starts at 0 and takes
``hidden = d * hidden + (1 - d) * value`` per step, and ``average = hidden /
(1 - d**counter)`` is what inference uses (the biased variance). That is
exactly :class:`bnjax.DebiasedStats` with ``weight = 1 - d**counter``.
Haiku keeps both in the input's dtype (bfloat16 input, bfloat16 EMAs:
haiku#396); the conversion reads them into float32. Every vector goes
through bnjax's one value check (finite, variances >= 0), both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from bnjax import _values
from bnjax._running import population_stats
from bnjax._types import BatchStats, DebiasedStats

_MEAN, _VAR = '/~/mean_ema', '/~/var_ema'
_EMA_KEYS = ('average', 'counter', 'hidden')
# to_haiku's counter for statistics without a DebiasedStats: d**counter
# underflows to 0 for any decay < 1 - 1e-9, so haiku's debiasing divides by
# 1: the imported statistics continue as a converged EMA (Flax's rule).
_CONVERGED = 2**30


def _mapping(fn, name, value, fix):
  if not isinstance(value, Mapping):
    raise TypeError(
      f'{fn}: {name} must be a mapping, got {type(value).__name__}; {fix}'
    )


def _layers(fn, params, state):
  """The hk.BatchNorm names of ``state``, its EMAs checked."""
  _mapping(fn, 'params', params, 'pass the params of hk.transform_with_state')
  _mapping(fn, 'state', state, 'pass the state of hk.transform_with_state')
  names = sorted(k[: -len(_MEAN)] for k in state if k.endswith(_MEAN))
  if not names:
    swapped = any(str(k).endswith(_MEAN) for k in params)
    raise ValueError(
      f'{fn}: state has no hk.BatchNorm statistics (no "<name>{_MEAN}" '
      f'entry), got keys {sorted(state)[:5]}; '
      + (
        'params has them: the arguments are swapped, pass (params, state) '
        'in that order'
        if swapped
        else 'pass the state of hk.transform_with_state'
      )
    )
  for name in names:
    for ema in (_MEAN, _VAR):
      entry = state.get(name + ema)
      if not isinstance(entry, Mapping) or set(_EMA_KEYS) - set(entry):
        raise ValueError(
          f'{fn}: state[{name + ema!r}] must be an EMA state {{counter, '
          f'hidden, average}}, got '
          f'{sorted(entry) if isinstance(entry, Mapping) else entry!r}'
        )
  return names


def _decay(fn, decay_rate):
  if decay_rate is None:
    return None
  if isinstance(decay_rate, (bool, np.bool_)) or not isinstance(
    decay_rate, (int, float, np.integer, np.floating)
  ):
    raise TypeError(
      f"{fn}: decay_rate must be a float in [0, 1), the hk.BatchNorm's "
      f'decay_rate, got {decay_rate!r}'
    )
  if not 0.0 <= decay_rate < 1.0:
    raise ValueError(
      f'{fn}: decay_rate={decay_rate} must be in [0, 1), the '
      "hk.BatchNorm's decay_rate"
    )
  return float(decay_rate)


def _vec(v):
  # In its own dtype: the value check refuses a bool (a mask or a flag) or a
  # complex value, which a cast to float32 here would hide (as 0.0 and 1.0,
  # or the real part). bfloat16 (NumPy kind 'V') widens to float32 exactly.
  a = np.asarray(v).reshape(-1)
  if a.dtype.kind == 'V' and jnp.issubdtype(a.dtype, jnp.floating):
    return a.astype(np.float32)
  return a


def _problems(vectors):
  """The one value check of a layer's vectors, each read as float32."""
  return _values.layer_problems(
    vectors,
    variances=[k for k in vectors if k.endswith(('var', 'weight'))]
    + [k for k in vectors if _VAR in k],
    dtypes=dict.fromkeys(vectors, np.float32),
  )


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
      exactly (train it with ``momentum=decay_rate``), and
      :func:`to_haiku` with the same ``decay_rate`` writes it back as it
      was (Haiku's ``hidden`` and ``counter``).

  Returns:
    ``{haiku module name: {'scale', 'bias', 'mean', 'var'[, 'stats']}}``:
    float32 vectors of shape ``(C,)``; ``mean`` and ``var`` are Haiku's
    debiased averages (what its inference uses), for a Flax ``batch_stats``
    collection or a :class:`bnjax.BatchStats`. ``scale``/``bias`` are absent
    where the layer has none.

  Raises:
    TypeError: ``params`` or ``state`` is not a mapping.
    ValueError: no hk.BatchNorm in ``state`` (the message says when the
      arguments are swapped), or a value is not valid state (non-finite, a
      negative variance), naming the layer; nothing is converted.

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
  names = _layers(fn, params, state)
  decay = _decay(fn, decay_rate)
  out, problems = {}, []
  for name in names:
    mean_ema, var_ema = state[name + _MEAN], state[name + _VAR]
    p = params.get(name, {})
    vectors = {
      f'{name}{_MEAN}/average': mean_ema['average'],
      f'{name}{_VAR}/average': var_ema['average'],
      **{f'{name}/{k}': p[k] for k in ('scale', 'offset') if k in p},
    }
    if decay is not None:
      vectors[f'{name}{_MEAN}/hidden'] = mean_ema['hidden']
      vectors[f'{name}{_VAR}/hidden'] = var_ema['hidden']
    vectors = {k: _vec(v) for k, v in vectors.items()}
    problems += _problems(vectors)
    counter = np.asarray(mean_ema['counter'])
    if counter.size != 1 or counter.dtype.kind not in 'iu' or counter < 0:
      problems.append(f'{name}{_MEAN}/counter must be an int >= 0')
    if problems:
      continue
    vec = {k: jnp.asarray(a, jnp.float32) for k, a in vectors.items()}
    layer: dict[str, Any] = {
      'mean': vec[f'{name}{_MEAN}/average'],
      'var': vec[f'{name}{_VAR}/average'],
    }
    for k, new in _AFFINE:
      if k in p:
        layer[new] = vec[f'{name}/{k}']
    if decay is not None:
      weight = 1.0 - np.float64(decay) ** int(counter)
      layer['stats'] = DebiasedStats(
        vec[f'{name}{_MEAN}/hidden'],
        vec[f'{name}{_VAR}/hidden'],
        jnp.full(layer['mean'].shape, weight, jnp.float32),
      )
    out[name] = layer
  _values.report(fn, problems, 'params and state')
  return out


_AFFINE = (('scale', 'scale'), ('offset', 'bias'))


# A state passed as a layer, by type: its arrays as to_haiku reads them.
_STATE_AS_LAYER = {
  DebiasedStats: lambda s: {**population_stats(s)._asdict(), 'stats': s},
  BatchStats: lambda s: s._asdict(),
}


def _as_layer(fn, name, layer):
  """A layer's arrays as a dict; a state tuple gives its statistics."""
  if type(layer) in _STATE_AS_LAYER:
    return _STATE_AS_LAYER[type(layer)](layer)
  if not isinstance(layer, Mapping) or not {'mean', 'var'} <= set(layer):
    raise TypeError(
      f'{fn}: layers[{name!r}] must be a mapping with "mean" and "var" (and '
      'optionally "scale", "bias", "stats"), a bnjax.BatchStats or a '
      f'bnjax.DebiasedStats, got '
      f'{sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__}'
    )
  stats = layer.get('stats')
  if stats is not None and not isinstance(stats, DebiasedStats):
    raise TypeError(
      f'{fn}: layers[{name!r}]["stats"] must be a bnjax.DebiasedStats (as '
      f'from_haiku returns), got {type(stats).__name__}'
    )
  return dict(layer)


def to_haiku(
  layers: Mapping[str, Any],
  params: Mapping[str, Any],
  state: Mapping[str, Any],
  *,
  decay_rate: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Writes bnjax/Flax BatchNorm arrays into a Haiku model's params and state.

  Args:
    layers: ``{haiku module name: {'mean', 'var'[, 'scale', 'bias',
      'stats']}}`` (:func:`from_haiku`'s layout; ``mean``/``var`` may come
      from a Flax ``batch_stats`` collection or
      :func:`bnjax.population_stats`), or ``{name: BatchStats or
      DebiasedStats}``.
    params: the Haiku model's params (from its ``init``): the template whose
      shapes and dtypes are kept.
    state: the Haiku model's state (from its ``init``), likewise.
    decay_rate: the layers' ``decay_rate``, needed for a layer with a
      :class:`bnjax.DebiasedStats` (its ``'stats'``).

  Returns:
    ``(params, state)``, new dicts. A layer with a
    :class:`bnjax.DebiasedStats` gets Haiku's debiased EMA state exactly:
    ``hidden`` is its ``mean``/``var``, ``counter`` the step count whose
    ``1 - decay_rate**counter`` is its ``weight``, so Haiku's training
    continues it as :class:`bnjax.DebiasedStats` would (a round trip of
    :func:`from_haiku` gives the original state). A layer without one gets
    ``average = hidden =`` the statistics and a large ``counter``: Haiku's
    inference uses them as they are and training continues them as a
    converged EMA.

  Raises:
    TypeError: an argument is not a mapping, or a layer is not one of the
      forms above.
    ValueError: an empty ``layers``, a layer Haiku does not have, a size
      that differs from Haiku's, a ``'stats'`` without ``decay_rate``, or an
      invalid value (non-finite, a negative variance); nothing is converted.

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
  known = _layers(fn, params, state)
  decay = _decay(fn, decay_rate)
  _mapping(fn, 'layers', layers, "pass {haiku name: {'mean', 'var', ...}}")
  if not layers:
    raise ValueError(
      f'{fn}: layers is empty, so nothing would be converted; pass '
      f"{{haiku name: {{'mean', 'var', ...}}}} for the layers {known}"
    )
  layers = {name: _as_layer(fn, name, layer) for name, layer in layers.items()}
  problems = []
  for name, layer in layers.items():
    if name not in known:
      raise ValueError(
        f'{fn}: {name!r} is not an hk.BatchNorm of this model; its layers '
        f'are {known}'
      )
    if 'stats' in layer and decay is None:
      raise ValueError(
        f'{fn}: layers[{name!r}] carries a DebiasedStats ("stats"); pass '
        "decay_rate=, the hk.BatchNorm's decay_rate, to write Haiku's "
        'counter for it (or drop "stats" to write a converged EMA)'
      )
    vectors = {f'{name}.{k}': _vec(v) for k, v in layer.items() if k != 'stats'}
    if 'stats' in layer:
      vectors.update(
        {
          f'{name}.stats.{k}': _vec(v)
          for k, v in layer['stats']._asdict().items()
        }
      )
    problems += _problems(vectors)
  _values.report(fn, problems, 'layers')
  params = {k: dict(v) for k, v in params.items()}
  state = {k: dict(v) for k, v in state.items()}
  for name, layer in layers.items():
    for key, ema in (('mean', _MEAN), ('var', _VAR)):
      state[name + ema] = _ema(fn, name, key, layer, state[name + ema], decay)
    for key, hk_key in (('scale', 'scale'), ('bias', 'offset')):
      if key in layer:
        params[name][hk_key] = _shaped(
          fn, layer[key], params[name][hk_key], f'{name}.{key}'
        )
  return params, state


def _ema(fn, name, key, layer, old, decay):
  """Haiku's EMA state {counter, hidden, average} for one statistic."""
  int_dtype = np.asarray(old['counter']).dtype
  if int_dtype.kind not in 'iu' or np.iinfo(int_dtype).max < _CONVERGED:
    # A bool counter was written as True (1), a uint8 one overflowed.
    raise TypeError(
      f"{fn}: the Haiku state's {name}/~/{key}_ema/counter is {int_dtype}; "
      f'it must be an int of at least 32 bits (Haiku keeps an int32 '
      f'counter, {_CONVERGED} for a converged EMA): pass the state of '
      'hk.transform_with_state'
    )
  value = _shaped(fn, layer[key], old['average'], f'{name}.{key}')
  if 'stats' not in layer:
    return {
      'counter': np.asarray(_CONVERGED, int_dtype),
      'hidden': value,
      'average': value,
    }
  stats = layer['stats']
  hidden = _shaped(
    fn, getattr(stats, key), old['hidden'], f'{name}.stats.{key}'
  )
  counter = _counter(fn, name, stats.weight, decay)
  if counter > 0:  # haiku's own arithmetic, in its dtype
    d = np.asarray(decay, hidden.dtype)
    value = (hidden / (np.ones((), hidden.dtype) - d**counter)).astype(
      hidden.dtype
    )
  return {
    'counter': np.asarray(counter, int_dtype),
    'hidden': hidden,
    'average': value,
  }


def _counter(fn, name, weight, decay) -> int:
  """The step count c with ``1 - decay**c`` equal to ``weight`` in float32."""
  w = np.asarray(weight, np.float32).reshape(-1)
  if w.size and np.any(w != w[0]):
    raise ValueError(
      f'{fn}: layers[{name!r}]["stats"].weight differs across channels '
      f'({w[:4].tolist()}...): Haiku keeps one counter per layer'
    )
  w0 = float(w[0]) if w.size else 0.0
  if w0 <= 0.0:
    return 0
  if w0 > 1.0:
    raise ValueError(
      f'{fn}: layers[{name!r}]["stats"].weight={w0} must be in [0, 1]'
    )
  if w0 == 1.0 or decay == 0.0:  # d**c below float32's resolution
    return _CONVERGED
  guess = np.log1p(-w0) / np.log(decay)
  near = range(max(1, int(round(guess)) - 2), int(round(guess)) + 3)
  exact = [c for c in near if np.float32(1.0 - decay**c) == np.float32(w0)]
  return min(exact, key=lambda c: abs(c - guess)) if exact else round(guess)


def _shaped(fn, value, like, what):
  like = np.asarray(like)
  if not jnp.issubdtype(like.dtype, jnp.floating):
    # Written in like's dtype: a bool or int would truncate the value.
    raise TypeError(
      f'{fn}: the Haiku array that {what} replaces is {like.dtype}, not a '
      f'float, so {what} would be written truncated; pass the params and '
      'state of hk.transform_with_state (float arrays)'
    )
  value = np.asarray(value, np.float32)
  if value.size != like.size:
    raise ValueError(
      f'{fn}: {what} has {value.size} values, but the Haiku layer has '
      f'{like.size} (shape {like.shape}); pass layers with as many channels'
    )
  return value.reshape(like.shape).astype(like.dtype)
