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

import jax.numpy as jnp
import numpy as np

from bnjax import _values
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

TORCH_KEYS = (
  'weight',
  'bias',
  'running_mean',
  'running_var',
  'num_batches_tracked',
)
_PARAMS = {'weight': 'scale', 'bias': 'bias'}
_STATS = {'running_mean': 'mean', 'running_var': 'var'}

_FROM, _TO = 'bnjax.interop.from_torch', 'bnjax.interop.to_torch'
_NO_LAYERS = (
  f'{_FROM}: found no BatchNorm layer (a "running_mean" key) '
  'in state_dict; pass the state dict of a model with '
  'BatchNorm layers, or name them in `layers`'
)


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
  sd = load_state_dict(state_dict)
  # 'encoder.ema_running_mean' is some other module's buffer, not a layer.
  return sorted(
    k[: -len('.running_mean')] if k != 'running_mean' else ''
    for k in sd
    if k == 'running_mean' or k.endswith('.running_mean')
  )


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
  absent: ``affine=False``), values finite, ``running_var >= 0``, and no two
  torch layers may map to one Flax path.

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
    TypeError: ``layers`` is not a mapping.
    KeyError: a prefix in ``layers`` has no BatchNorm state.
    ValueError: invalid state (see above), or no BatchNorm layer at all.

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
  dtype = _float_dtype(_FROM, dtype)
  sd = load_state_dict(state_dict)
  if layers is None:
    layers = {p: p for p in bn_prefixes(sd)}
    if not layers:
      raise ValueError(_NO_LAYERS)
  if not isinstance(layers, Mapping):
    raise TypeError(
      f'{_FROM}: layers must map torch prefixes to Flax paths, got '
      f'{type(layers).__name__} {layers!r}; pass e.g. '
      f'{{{next(iter(bn_prefixes(sd)), "bn1")!r}: "BatchNorm_0"}}, or None '
      'for every BatchNorm layer'
    )
  missing = [p for p in layers if _layer_keys(p)['running_mean'] not in sd]
  if missing:
    raise KeyError(
      f'{_FROM}: no BatchNorm state for the prefixes {missing} in '
      f'layers (no <prefix>.running_mean key); BatchNorm prefixes found: '
      f'{bn_prefixes(sd)}'
    )
  problems: list[str] = []
  targets: dict[tuple[str | int, ...], str] = {}
  for prefix, path in layers.items():
    tree = _split(path, prefix, _FROM)
    if tree in targets:
      problems.append(
        f'{targets[tree]!r} and {prefix!r} both map to the Flax path '
        f'{"/".join(map(str, tree))!r}; the second would overwrite the first'
      )
    targets[tree] = prefix
    problems += _layer_problems(sd, prefix)
  if problems:
    _values.report(_FROM, problems, 'state_dict')
  out: dict[str, dict] = {'params': {}, 'batch_stats': {}}
  for prefix, path in layers.items():
    keys, tree = _layer_keys(prefix), _split(path, prefix, _FROM)
    for names, coll in ((_STATS, 'batch_stats'), (_PARAMS, 'params')):
      for torch_name, flax_name in names.items():
        if keys[torch_name] in sd:
          v = sd[keys[torch_name]]
          # A complex running mean (flax's, for complex input) stays complex.
          dt = (
            jnp.promote_types(dtype, v.dtype) if v.dtype.kind == 'c' else dtype
          )
          _put(out[coll], tree, flax_name, jnp.asarray(v, dt))
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
  keys = {p: _layer_keys(p)['num_batches_tracked'] for p in bn_prefixes(sd)}
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


def _layer_problems(sd: Mapping[str, np.ndarray], prefix: str) -> list[str]:
  """What is wrong with one torch BatchNorm layer's state (empty if valid):
  the torch-specific keys here, the values by the one value check."""
  keys = _layer_keys(prefix)
  problems = []
  present = [n for n in ('weight', 'bias') if keys[n] in sd]
  if len(present) == 1:
    absent = keys['bias' if present == ['weight'] else 'weight']
    problems.append(
      f'{keys[present[0]]!r} is present but {absent!r} is missing: an '
      'affine torch BatchNorm has both, affine=False neither'
    )
  if keys['running_var'] not in sd:
    return problems + [f'{keys["running_var"]!r} is missing']
  vectors = {
    keys[n]: sd[keys[n]]
    for n in ('weight', 'bias', 'running_mean', 'running_var')
    if keys[n] in sd
  }
  return problems + _values.layer_problems(
    vectors,
    variances=(keys['running_var'],),
    complex_ok=(keys['running_mean'],),
  )


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
      gets 0).

  Returns:
    ``{'<prefix>.weight': ..., ...}`` as float32 NumPy arrays, and
    ``num_batches_tracked`` as int64, ready for ``torch.from_numpy`` and
    ``load_state_dict(..., strict=False)``. Each array is a writable copy
    that owns its memory: torch's in-place updates never reach the JAX
    arrays it came from.

  Raises:
    TypeError: ``layers`` is not a mapping, or a path is not a string, int
      or tuple of them.
    KeyError: a path is not in the variables (the message names the level).
    ValueError: the statistics are not valid torch state (a non-finite
      value, a negative variance, a complex mean), each problem naming its
      torch key; nothing is returned.

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
  counts: Mapping[str, int] = (
    num_batches_tracked
    if isinstance(num_batches_tracked, Mapping)
    else dict.fromkeys(layers, num_batches_tracked)
  )
  for prefix, n in counts.items():
    if (
      isinstance(n, (bool, np.bool_))
      or not isinstance(n, (int, np.integer))
      or n < 0
    ):
      raise TypeError(
        f'{_TO}: num_batches_tracked must be an int >= 0 (or a mapping '
        f'of them by prefix), got {n!r} for {prefix!r}'
      )
  out: dict[str, np.ndarray] = {}
  problems: list[str] = []
  for prefix, path in layers.items():
    keys = _layer_keys(prefix)
    tree = _split(path, prefix, _TO)
    stats = _get(variables.get('batch_stats', {}), tree, 'batch_stats')
    for torch_name, flax_name in _STATS.items():
      v = np.asarray(stats[flax_name])
      if np.iscomplexobj(v):
        problems.append(
          f'{keys[torch_name]!r} ({"/".join(map(str, tree))}/{flax_name}) is '
          'complex; torch BatchNorm state is real'
        )
      out[keys[torch_name]] = _owned(np.real(v))
    params = _get(variables.get('params', {}), tree, None) or {}
    for torch_name, flax_name in _PARAMS.items():
      if flax_name in params:
        out[keys[torch_name]] = _owned(params[flax_name])
    out[keys['num_batches_tracked']] = np.array(counts.get(prefix, 0), np.int64)
    problems += _layer_problems(out, prefix)
  _values.report(_TO, problems, 'variables')
  return out


def _float_dtype(fn: str, dtype) -> Any:
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(
      f'{fn}: dtype={dtype!r} is not a dtype; pass e.g. dtype=jnp.float32'
    ) from None
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
      f'{fn}: dtype={dt} must be a floating dtype (statistics and '
      'parameters are real numbers); pass e.g. dtype=jnp.float32'
    )
  return dt


def _owned(v) -> np.ndarray:
  """A float32 copy that owns its memory (np.asarray of a JAX array can be a
  read-only view of the JAX buffer)."""
  return np.array(v, np.float32, copy=True)


def _layer_keys(prefix: str) -> dict[str, str]:
  dot = f'{prefix}.' if prefix else ''
  return {k: dot + k for k in TORCH_KEYS}


def _split(path, prefix: str, fn: str) -> tuple[str | int, ...]:
  """A Flax module path as a tuple of keys.

  A string splits at '/' and '.'; its all-digit parts become ints, the
  index of a layer in a list (torch's ``ModuleList``/``Sequential`` and
  nnx's lists alike). A tuple is taken as it is (strings and ints), so a
  linen module literally named '0' is ``('0',)``. An int is one index.
  """
  if isinstance(path, str):
    parts: tuple[str | int, ...] = tuple(
      int(p) if p.isdigit() else p
      for p in path.replace('.', '/').split('/')
      if p
    )
  elif isinstance(path, (int, np.integer)) and not isinstance(path, bool):
    parts = (int(path),)
  elif isinstance(path, (tuple, list)) and all(
    isinstance(p, (str, int, np.integer)) and not isinstance(p, bool)
    for p in path
  ):
    parts = tuple(p if isinstance(p, str) else int(p) for p in path)
  else:
    raise TypeError(
      f'{fn}: the Flax path of {prefix!r} must be a string '
      f'("layer1/0/bn1"), an int or a tuple of strings and ints, got '
      f'{type(path).__name__} {path!r} in layers'
    )
  if not parts:
    raise ValueError(
      f'{fn}: empty Flax module path {path!r} for {prefix!r} in layers; name '
      'the module, e.g. "BatchNorm_0"'
    )
  return parts


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
