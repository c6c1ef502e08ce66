r"""PyTorch <-> bnjax/Flax conversion of BatchNorm state.

A PyTorch ``BatchNorm{1,2,3}d`` layer stores ``weight``, ``bias``,
``running_mean``, ``running_var`` and ``num_batches_tracked``. The same layer
in Flax (and bnjax) is ``params/{scale, bias}`` and ``batch_stats/{mean,
var}``. The per-channel vectors are the same numbers in both: only the names
differ, and the data layout, where torch's channel axis is 1 (NCHW) and
Flax's is the last (NHWC); :func:`nchw_to_nhwc` and
:func:`conv_kernel_from_torch` move activations and conv kernels across.

Two conventions differ and are easy to port wrongly:

* **Momentum.** torch's ``momentum=p`` weights the *new* batch,
  ``new = (1 - p) old + p batch``; Flax's ``momentum=m`` weights the *old*
  value, ``new = m old + (1 - m) batch``. So ``m = 1 - p``: torch's default
  0.1 is 0.9 here (not Flax's default 0.99). See :func:`momentum_from_torch`.
  torch's ``momentum=None`` (a cumulative average) has no EMA equivalent.
* **Variance.** torch's running variance averages the *unbiased* batch
  variance (divided by n - 1); Flax and bnjax average the *biased* one
  (divided by n). Converted statistics are copied as they are, and eval mode
  normalizes with the stored value, so eval outputs agree exactly. Only
  further training updates differ: the batch term of torch's variance update
  is ``n / (n - 1)`` times bnjax's, which matters for small n.

Inputs are a mapping of arrays (torch tensors, NumPy or JAX arrays), a
``.npz`` file, a ``.safetensors`` file, or a torch ``.pt``/``.pth`` file. A
torch file is read with ``torch.load(..., weights_only=True)`` only, never by
arbitrary unpickling.

Example:
  >>> import numpy as np
  >>> from bnjax import interop
  >>> sd = {'bn.weight': np.ones(2), 'bn.bias': np.zeros(2),
  ...       'bn.running_mean': np.array([0.5, 1.]),
  ...       'bn.running_var': np.array([2., 3.]),
  ...       'bn.num_batches_tracked': np.array(7)}
  >>> v = interop.from_torch(sd, {'bn': 'BatchNorm_0'})
  >>> v['batch_stats']['BatchNorm_0']['var']
  Array([2., 3.], dtype=float32)
  >>> interop.momentum_from_torch(0.1)
  0.9
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _scalar_checks, _torch_io, _values
from bnjax._haiku import from_haiku, to_haiku
from bnjax._state_dict import load_state_dict
from bnjax._torch_layout import (
  conv_kernel_from_torch,
  dense_kernel_from_torch,
  momentum_from_torch,
  momentum_to_torch,
  nchw_to_nhwc,
  nhwc_to_nchw,
)

__all__ = [
  'batches_tracked',
  'bn_prefixes',
  'conv_kernel_from_torch',
  'dense_kernel_from_torch',
  'from_haiku',
  'from_torch',
  'load_state_dict',
  'momentum_from_torch',
  'momentum_to_torch',
  'nchw_to_nhwc',
  'nhwc_to_nchw',
  'to_haiku',
  'to_torch',
]

_PARAMS = {'weight': 'scale', 'bias': 'bias'}
_STATS = {'running_mean': 'mean', 'running_var': 'var'}
_FROM, _TO = 'bnjax.interop.from_torch', 'bnjax.interop.to_torch'


def bn_prefixes(state_dict: Any) -> list[str]:
  """Prefixes (``'layer1.0.bn1'``) of the BatchNorm layers in a state dict.

  A prefix is a BatchNorm layer when ``<prefix>.running_mean`` exists.

  Args:
    state_dict: anything :func:`load_state_dict` reads.

  Returns:
    The sorted prefixes.

  Example:
    >>> import numpy as np
    >>> from bnjax import interop
    >>> interop.bn_prefixes({'conv.weight': np.ones((2, 1, 3, 3)),
    ...                      'layer1.0.bn1.running_mean': np.zeros(2)})
    ['layer1.0.bn1']
  """
  return _torch_io.bn_prefixes(load_state_dict(state_dict))


def from_torch(
  state_dict: Any,
  layers: Mapping[str, Any] | None = None,
  *,
  dtype: Any = jnp.float32,
) -> dict[str, dict]:
  """Converts torch BatchNorm state to Flax variables.

  Every layer is validated before anything is built, and all problems are
  reported together, each naming the torch key: the four vectors must be
  1-D with one length, ``weight`` and ``bias`` present together (or both
  absent: ``affine=False``), values finite and within ``dtype``'s range,
  ``running_var >= 0``, and no two torch layers may map to one Flax path.

  Args:
    state_dict: a whole model's state dict (see :func:`load_state_dict` for
      the accepted forms; float16 and bfloat16 tensors are read exactly).
      Keys that are not BatchNorm state are ignored.
    layers: maps torch layer prefixes (``'layer1.0.bn1'``) to Flax module
      paths (``'layer1_0/bn1'`` or ``('layer1_0', 'bn1')``). None converts
      every BatchNorm layer found, with the path taken from the prefix
      (dots become levels). In a string path an all-digit level is an int,
      a list index, as in an nnx model's state (``'layer1/0/bn1'`` is
      ``('layer1', 0, 'bn1')``); a tuple is taken as it is.
    dtype: floating dtype of the returned arrays (float32; keep stats >=
      float32). A complex running mean stays complex.

  Returns:
    ``{'params': {...}, 'batch_stats': {...}}`` nested by module path, ready
    to merge into a Flax model's variables. An affine-free torch layer
    (``affine=False``) gives no params entry.

  Raises:
    TypeError: ``layers`` is not a mapping, or a prefix not a string.
    KeyError: a prefix in ``layers`` has no BatchNorm state.
    ValueError: invalid state (see above), no BatchNorm layer at all, or
      an empty ``layers``.

  Example:
    >>> import numpy as np
    >>> from bnjax import interop
    >>> sd = {'layer1.0.bn1.weight': np.ones(2), 'layer1.0.bn1.bias': np.zeros(2),
    ...       'layer1.0.bn1.running_mean': np.zeros(2),
    ...       'layer1.0.bn1.running_var': np.ones(2)}
    >>> v = interop.from_torch(sd)             # every layer, path from prefix
    >>> v['batch_stats']['layer1'][0]['bn1']['var']  # '0': a list index
    Array([1., 1.], dtype=float32)
    >>> v = interop.from_torch(sd, {'layer1.0.bn1': 'layer1_0/bn1'})
    >>> list(v['params']['layer1_0']['bn1'])
    ['scale', 'bias']
  """
  dtype = _scalar_checks.float_dtype(
    _FROM, 'dtype', dtype, 'statistics and parameters'
  )
  sd = load_state_dict(state_dict)
  if layers is None:
    layers = _torch_io.every_layer(_FROM, sd)
  if not isinstance(layers, Mapping):
    raise TypeError(
      f'{_FROM}: layers must map torch prefixes to Flax paths, got '
      f'{type(layers).__name__} {layers!r}; pass e.g. '
      f'{{{next(iter(bn_prefixes(sd)), "bn1")!r}: "BatchNorm_0"}}, or None '
      'for every BatchNorm layer'
    )
  _torch_io.check_prefixes(_FROM, sd, layers)
  stored = jax.dtypes.canonicalize_dtype(dtype)  # float32 without x64
  problems: list[str] = []
  targets: dict[tuple[str | int, ...], str] = {}
  for prefix, path in layers.items():
    tree = _torch_io.split_path(path, prefix, _FROM, 'Flax')
    if tree in targets:
      problems.append(
        f'{targets[tree]!r} and {prefix!r} both map to the Flax path '
        f'{"/".join(map(str, tree))!r}; the second would overwrite the first'
      )
    targets[tree] = prefix
    problems += _torch_io.layer_problems(
      sd, prefix, dtypes=dict.fromkeys(_torch_io.TORCH_KEYS[:4], stored)
    )
  _values.report(_FROM, problems, 'state_dict')
  out: dict[str, dict] = {'params': {}, 'batch_stats': {}}
  for prefix, path in layers.items():
    tree = _torch_io.split_path(path, prefix, _FROM, 'Flax')
    for torch_name, v in _torch_io.read_layer(sd, prefix).items():
      coll, name = (
        ('params', _PARAMS[torch_name])
        if torch_name in _PARAMS
        else ('batch_stats', _STATS[torch_name])
      )
      # A complex running mean (flax's, for complex input) stays complex.
      dt = jnp.promote_types(dtype, v.dtype) if v.dtype.kind == 'c' else dtype
      _put(out[coll], tree, name, jnp.asarray(v, dt))
  return out


def batches_tracked(state_dict: Any) -> dict[str, int]:
  """``{prefix: num_batches_tracked}`` of every BatchNorm layer that has one.

  Flax does not count batches; pass this to :func:`to_torch` to write the
  counts back.

  Args:
    state_dict: anything :func:`load_state_dict` reads.

  Returns:
    The counts by layer prefix.

  Example:
    >>> import numpy as np
    >>> from bnjax import interop
    >>> interop.batches_tracked({'bn.running_mean': np.zeros(2),
    ...                          'bn.num_batches_tracked': np.array(5)})
    {'bn': 5}
  """
  sd = load_state_dict(state_dict)
  keys = {
    p: _torch_io.layer_keys(p)['num_batches_tracked']
    for p in _torch_io.bn_prefixes(sd)
  }
  out = {}
  for p, k in keys.items():
    if k in sd:
      n = sd[k]
      if n.size != 1 or n.dtype.kind not in 'iu' or n.reshape(()) < 0:
        raise ValueError(
          f'bnjax.interop.batches_tracked: the state_dict entry {k!r} must '
          f'be one int >= 0 (a count of batches), got {n!r}'
        )
      out[p] = int(n.reshape(()))
  return out


def to_torch(
  variables: Mapping[str, Any],
  layers: Mapping[str, Any],
  *,
  num_batches_tracked: int | Mapping[str, int] = 0,
) -> dict[str, np.ndarray]:
  """Converts Flax variables of BatchNorm layers to torch state-dict entries.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a Flax model.
    layers: maps torch prefixes to Flax module paths, as in
      :func:`from_torch`.
    num_batches_tracked: the value to store (Flax does not count batches),
      or ``{prefix: count}`` per layer, such as :func:`bnjax.interop.batches_tracked` of
      the torch state dict the variables came from (a layer it leaves out
      gets 0; a prefix not in ``layers`` is refused, as a typo would be).

  Returns:
    ``{'<prefix>.weight': ..., ...}`` as float32 NumPy arrays, and
    ``num_batches_tracked`` as int64, ready for ``torch.from_numpy`` and
    ``load_state_dict(..., strict=False)``. Each array is a writable copy
    that owns its memory: torch's in-place updates never reach the JAX
    arrays it came from.

  Raises:
    TypeError: ``layers`` is not a mapping, a prefix not a string, or a
      path not a string, int or tuple of them; a count not an int >= 0.
    KeyError: a path is not in the variables (the message names the level).
    ValueError: the statistics are not valid torch state (a non-finite
      value, a negative variance, a complex mean), each problem naming its
      torch key; nothing is returned. A count for a prefix not in
      ``layers``; an empty ``layers``.

  Example:
    >>> import jax, bnjax.linen, jax.numpy as jnp
    >>> from bnjax import interop
    >>> v = bnjax.linen.BatchNorm().init(jax.random.key(0), jnp.ones((2, 3)),
    ...                                  use_running_average=True)
    >>> sd = interop.to_torch({'params': {'BatchNorm_0': v['params']},
    ...                        'batch_stats': {'BatchNorm_0': v['batch_stats']}},
    ...                       {'bn1': 'BatchNorm_0'})
    >>> sorted(sd)
    ['bn1.bias', 'bn1.num_batches_tracked', 'bn1.running_mean', 'bn1.running_var', 'bn1.weight']
  """
  if not isinstance(layers, Mapping):
    raise TypeError(
      f'{_TO}: layers must map torch prefixes to Flax paths, got '
      f'{type(layers).__name__} {layers!r}'
    )
  if not isinstance(variables, Mapping):
    raise TypeError(
      f'{_TO}: variables must be a mapping {{"params": ..., "batch_stats": '
      f'...}} of a Flax model, got {type(variables).__name__}'
    )
  _torch_io.check_concrete(_TO, variables, 'variables')
  # to_torch has no layers=None (Flax variables do not say which
  # collections are BatchNorm): its message does not offer it.
  counts = _torch_io.batch_counts(
    _TO, num_batches_tracked, layers, none_ok=False
  )
  found = {}
  for prefix, path in layers.items():
    tree = _torch_io.split_path(path, prefix, _TO, 'Flax')
    stats = _get(variables.get('batch_stats', {}), tree, 'batch_stats')
    params = _get(variables.get('params', {}), tree, None) or {}
    found[prefix] = {
      **{t: params[f] for t, f in _PARAMS.items() if f in params},
      **{t: stats[f] for t, f in _STATS.items()},
    }
  return _torch_io.write_layers(_TO, found, counts, 'variables')


def _put(root: dict, tree: Sequence[str | int], name: str, value) -> None:
  node = root
  for p in tree:
    node = node.setdefault(p, {})
  node[name] = value


def _get(root, tree: Sequence[str | int], collection: str | None):
  """The node at ``tree``; an int part also matches its string (a linen
  name) and a digit string its int (an nnx list index)."""
  node = root
  for depth, p in enumerate(tree):
    keys = list(node) if isinstance(node, Mapping) else []
    match = [k for k in keys if k == p or str(k) == str(p)]
    if not match:
      if collection is None:
        return None
      where = '/'.join(map(str, tree[:depth])) or 'the top level'
      raise KeyError(
        f'{_TO}: no {"/".join(map(str, tree))!r} (a path in layers) in the '
        f'{collection} '
        f'collection: at {where} there is no {p!r}, only {keys}'
      )
    node = node[match[0]]
  return node
