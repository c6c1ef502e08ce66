"""PyTorch BatchNorm state into and out of ``bnjax.equinox`` layers.

``bnjax.equinox.from_torch`` and ``to_torch`` (re-exported there): an
adapter over :mod:`bnjax._torch_io`, the path :func:`bnjax.interop.from_torch`
and :func:`bnjax.interop.to_torch` take, with their argument names, checks
and owned copies. What differs is where the arrays live: an Equinox model
holds ``weight``/``bias`` and an ``eqx.nn.State`` the running statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _running, _torch_io, _values
from bnjax._equinox_layer import Layer, check_state
from bnjax._state_dict import load_state_dict
from bnjax._types import RenormStats

# The (mean, var) that torch's eval reproduces, where it differs from the
# state's population statistics: a renorm std as std**2 - eps, in float64.
# (The state loaded from a population is its row of _running.RULES.)
_TO_POPULATION: dict[type, Callable] = {
  RenormStats: lambda fn, s, eps: (
    s.mean,
    np.square(np.asarray(s.std, np.float64)) - eps,
  ),
}


def _population(fn: str, stats: Any, eps: float):
  rule = _TO_POPULATION.get(type(stats))
  if rule is not None:
    return rule(fn, stats, eps)
  # The converters' one value check (_values) judges the result, by key.
  pop = _running.population_stats_as(fn, stats, check=False)
  return pop.mean, pop.var


def from_torch(
  model: Any, state: eqx.nn.State, state_dict: Any, layers: Any = None
) -> tuple[Any, eqx.nn.State]:
  """Loads PyTorch BatchNorm layers into an Equinox model and its State.

  :func:`bnjax.interop.from_torch` for an Equinox model: the same
  ``state_dict`` and ``layers``, the same checks (every problem listed,
  nothing loaded), plus the target layer's size and affinity. It takes and
  returns ``(model, state)`` where interop returns Flax variables, because
  an Equinox layer keeps ``weight``/``bias`` in the model and the running
  statistics in the ``eqx.nn.State``; it has no ``dtype``, because each
  array takes the dtype the layer already has. ``running_mean`` and
  ``running_var`` become the statistics inference uses, in the layer's
  state type: a :class:`bnjax.BatchStats` as they are, a
  :class:`bnjax.DebiasedStats` with weight 1, a :class:`BatchRenorm`'s
  ``std = sqrt(running_var + eps)`` (torch's running variance averages the
  unbiased batch variance: see :mod:`bnjax.interop`). Torch's momentum
  ``p`` is ``1 - p`` here.

  Args:
    model: an Equinox model holding :class:`BatchNorm` or
      :class:`BatchRenorm` layers.
    state: its ``eqx.nn.State``.
    state_dict: a torch state dict (any source
      :func:`bnjax.interop.load_state_dict` reads).
    layers: ``{torch prefix: layer}``, the layer given as a function
      picking it (as for ``eqx.tree_at``, ``lambda m: m.bn1``) or as its
      path in the model (``'layer1/0/bn1'``: attributes, and ints that
      index a list or ``eqx.nn.Sequential``; ``''``: the model itself).
      None: every BatchNorm layer of the state dict, at the path of its
      prefix (``'layer1.0.bn1'`` is ``model.layer1[0].bn1``).

  Returns:
    ``(model, state)``, new.

  Raises:
    TypeError: ``layers`` is not a mapping of functions or paths picking a
      bnjax.equinox layer.
    KeyError: a prefix has no BatchNorm state, or a path no layer.
    ValueError: an empty ``layers``; invalid values (a size other than
      ``input_size``, a non-finite value or one past the layer dtype's
      range, a negative variance, a complex value, weight and bias where
      the layer has none or the reverse), each named; nothing is loaded.

  Example:
    >>> import numpy as np, equinox as eqx, bnjax.equinox
    >>> bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(2, 'b')
    >>> sd = {'bn.weight': np.ones(2), 'bn.bias': np.zeros(2),
    ...       'bn.running_mean': np.array([1.0, 2.0]),
    ...       'bn.running_var': np.array([3.0, 4.0])}
    >>> bn, state = bnjax.equinox.from_torch(bn, state, sd, {'bn': ''})
    >>> state.get(bn.state_index).var
    Array([3., 4.], dtype=float32)
  """
  fn = 'bnjax.equinox.from_torch'
  check_state(fn, state)
  sd = load_state_dict(state_dict)
  if layers is None:
    layers = _torch_io.every_layer(fn, sd)
  picked = _pick(fn, model, state, layers)
  _torch_io.check_prefixes(fn, sd, picked)
  problems: list[str] = []
  seen: dict[int, str] = {}
  for prefix, (_, layer) in picked.items():
    if id(layer) in seen:
      problems.append(
        f'{seen[id(layer)]!r} and {prefix!r} both pick the same layer; the '
        'second would overwrite the first'
      )
    seen[id(layer)] = prefix
    problems += _torch_io.layer_problems(
      sd,
      prefix,
      affine=layer.weight is not None,
      size=layer.input_size,
      complex_ok=False,
      dtypes=_dtypes(layer, state),
    )
  _values.report(fn, problems, 'state_dict')
  for prefix, (where, layer) in picked.items():
    v = _torch_io.read_layer(sd, prefix)
    if layer.weight is not None:
      dtype = layer.weight.dtype
      model = eqx.tree_at(
        functools.partial(_affine, where),
        model,
        (jnp.asarray(v['weight'], dtype), jnp.asarray(v['bias'], dtype)),
      )
    old = state.get(layer.state_index)
    mean, var = (
      jnp.asarray(v[k], old.mean.dtype) for k in ('running_mean', 'running_var')
    )
    # Not None: _pick refused the states that cannot load a population.
    load = cast(Callable, _running.rules_of(old).from_population)
    new = load(mean, var, layer.eps)
    state = state.set(layer.state_index, new)
  return model, state


def to_torch(
  model: Any,
  state: eqx.nn.State,
  layers: Any = None,
  *,
  num_batches_tracked: int | Mapping[str, int] = 0,
) -> dict[str, np.ndarray]:
  """The PyTorch state dict entries of an Equinox model's BatchNorm layers.

  :func:`bnjax.interop.to_torch` for an Equinox model (it takes
  ``(model, state)`` where interop takes Flax variables: see
  :func:`from_torch`), with the same ``layers`` and
  ``num_batches_tracked``, the same checks and owned copies.
  ``running_mean``/``running_var`` are the statistics inference uses
  (:func:`bnjax.population_stats`; a :class:`BatchRenorm`'s ``std**2 -
  eps``), which torch's eval ``(x - running_mean) / sqrt(running_var +
  eps)`` reproduces.

  Args:
    model: an Equinox model holding :class:`BatchNorm` or
      :class:`BatchRenorm` layers.
    state: its ``eqx.nn.State``.
    layers: ``{torch prefix: function or path}``, as :func:`from_torch`'s;
      None: every bnjax.equinox layer of the model, its prefix its path
      (``'layer1.0.bn1'``); a model with none is refused.
    num_batches_tracked: the count to store (bnjax does not count
      batches), or ``{prefix: count}`` (:func:`bnjax.interop.batches_tracked`
      of the state dict the model came from; a layer it leaves out gets 0,
      a prefix of no converted layer is refused).

  Returns:
    ``{'<prefix>.weight': ..., ...}`` as float32 NumPy arrays, and
    ``num_batches_tracked`` as int64. Each array is a writable copy that
    owns its memory: torch's in-place updates never reach the model.

  Raises:
    TypeError: ``layers`` as in :func:`from_torch`, or a count that is not
      an int >= 0.
    KeyError: a path picks no layer.
    ValueError: the statistics are not valid torch state (non-finite, a
      negative variance, complex), each naming its torch key; nothing is
      returned. A count for a prefix of no converted layer; an empty
      ``layers``.

  Example:
    >>> import equinox as eqx, bnjax.equinox
    >>> bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(2, 'b')
    >>> sorted(bnjax.equinox.to_torch(bn, state, {'bn': lambda m: m}))
    ['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var', 'bn.weight']
  """
  fn = 'bnjax.equinox.to_torch'
  check_state(fn, state)
  _torch_io.check_concrete(fn, (model, state), 'model or state')
  picked = _pick(
    fn, model, state, _all_layers(fn, model) if layers is None else layers
  )
  counts = _torch_io.batch_counts(fn, num_batches_tracked, picked)
  found = {}
  for prefix, (_, layer) in picked.items():
    mean, var = _population(fn, state.get(layer.state_index), layer.eps)
    found[prefix] = {'running_mean': mean, 'running_var': var}
    if layer.weight is not None:
      found[prefix].update(weight=layer.weight, bias=layer.bias)
  sizes = {p: layer.input_size for p, (_, layer) in picked.items()}
  return _torch_io.write_layers(fn, found, counts, 'model and state', sizes)


def _dtypes(layer: Layer, state: eqx.nn.State) -> dict[str, Any]:
  """``{torch name: dtype}`` each value of the layer is loaded in."""
  stats = state.get(layer.state_index)[0].dtype
  out = dict.fromkeys(_torch_io.STATS, stats)
  if layer.weight is not None:
    out.update(dict.fromkeys(_torch_io.AFFINE, layer.weight.dtype))
  return out


def _affine(where, model):
  return where(model).weight, where(model).bias


def _pick(fn, model, state, layers) -> dict[str, tuple[Callable, Layer]]:
  """``{prefix: (where, layer)}``, each a bnjax.equinox layer."""
  if not isinstance(layers, Mapping):
    raise TypeError(
      f'{fn}: layers must map torch prefixes to functions or paths picking '
      f"the layer, e.g. {{'bn1': lambda m: m.bn1}} or {{'bn1': 'bn1'}}, got "
      f'{type(layers).__name__}'
    )
  picked = {}
  for prefix, where in layers.items():
    if not callable(where):
      where = _path(fn, prefix, where)
      layer = where(model)
    else:
      layer = _call_picker(fn, prefix, where, model)
    if not isinstance(layer, Layer):
      kind = type(layer)
      raise TypeError(
        f'{fn}: layers[{prefix!r}] must pick a bnjax.equinox.BatchNorm or '
        'BatchRenorm (a function of the model, e.g. lambda m: m.bn1, or a '
        f'path, e.g. "bn1"); it gives a {kind.__module__}.{kind.__qualname__}'
      )
    try:
      stats = state.get(layer.state_index)
    except KeyError:
      raise ValueError(
        f'{fn}: state has no entry for the layer of layers[{prefix!r}] (the '
        'state of another model?); pass the state eqx.nn.make_with_state '
        'made with this model'
      ) from None
    if _running.rules_of(stats).from_population is None:
      raise TypeError(
        f'{fn}: the state of layers[{prefix!r}] is a '
        f'{type(stats).__name__}; a bnjax.equinox '
        'layer keeps a BatchStats, DebiasedStats or RenormStats'
      )
    picked[prefix] = (where, layer)
  return picked


def _call_picker(fn: str, prefix: str, where: Callable, model: Any) -> Any:
  """``where(model)``; a lookup it fails (``lambda m: m.bn2`` on a model
  with no bn2) is a KeyError naming the prefix, as a path's is."""
  try:
    return where(model)
  except (AttributeError, IndexError, KeyError) as e:
    raise KeyError(
      f'{fn}: the function of layers[{prefix!r}] picks nothing in the model: '
      f'{type(e).__name__}: {e}; pick a bnjax.equinox layer of this model'
    ) from e


def _path(fn: str, prefix: str, path: Any) -> Callable:
  """A function picking the node at ``path`` (as :func:`_at`)."""
  empty = isinstance(path, (str, tuple)) and not path
  parts = () if empty else _torch_io.split_path(path, prefix, fn, 'Equinox')
  return lambda m: _at(fn, m, parts)


def _at(fn: str, model: Any, parts: tuple) -> Any:
  node = model
  for depth, p in enumerate(parts):
    try:
      node = node[p] if isinstance(p, int) else getattr(node, p)
    except (AttributeError, IndexError, KeyError, TypeError):
      where = '/'.join(map(str, parts[:depth])) or 'the model'
      raise KeyError(
        f'{fn}: no {"/".join(map(str, parts))!r} (a path in layers) in the '
        f'model: {where} has no {p!r}'
      ) from None
  return node


def _all_layers(fn: str, model: Any) -> dict[str, tuple]:
  """``{dotted path: path}`` of every bnjax.equinox layer in the model."""
  found = jax.tree_util.tree_flatten_with_path(
    model, is_leaf=lambda n: isinstance(n, Layer)
  )[0]
  if not any(isinstance(leaf, Layer) for _, leaf in found):
    # An eqx.nn.BatchNorm model would give {}: nothing written, no error.
    raise ValueError(
      f'{fn}: model holds no bnjax.equinox BatchNorm or BatchRenorm layer '
      'for layers=None to convert; build the model with them '
      '(bnjax.equinox.BatchNorm for eqx.nn.BatchNorm), or name them in layers'
    )
  return {
    '.'.join(map(str, parts)): parts
    for parts in (
      tuple(_key(k) for k in path)
      for path, leaf in found
      if isinstance(leaf, Layer)
    )
  }


def _key(k: Any) -> str | int:
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return k.idx
  return k.key
