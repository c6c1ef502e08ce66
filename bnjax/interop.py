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

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TORCH_KEYS = (
  'weight',
  'bias',
  'running_mean',
  'running_var',
  'num_batches_tracked',
)
_PARAMS = {'weight': 'scale', 'bias': 'bias'}
_STATS = {'running_mean': 'mean', 'running_var': 'var'}

_NO_LAYERS = (
  'from_torch: found no BatchNorm layer (a "running_mean" key) '
  'in the state dict; pass the state dict of a model with '
  'BatchNorm layers, or name them in `layers`'
)


def momentum_from_torch(p: float) -> float:
  """Flax/bnjax ``momentum`` for a torch BatchNorm ``momentum=p``: ``1 - p``.

  Raises:
    ValueError: ``p`` is None (torch's cumulative average, which no EMA
      momentum reproduces) or outside [0, 1].
  """
  if p is None:
    raise ValueError(
      'momentum_from_torch: torch momentum=None is a cumulative average, '
      'not an EMA; no Flax momentum reproduces it'
    )
  if not 0.0 <= p <= 1.0:
    raise ValueError(
      f'momentum_from_torch: momentum must be in [0, 1], got {p}'
    )
  return round(1.0 - p, 12)


def momentum_to_torch(m: float) -> float:
  """torch ``momentum`` for a Flax/bnjax ``momentum=m``: ``1 - m``."""
  if not 0.0 <= m <= 1.0:
    raise ValueError(f'momentum_to_torch: momentum must be in [0, 1], got {m}')
  return round(1.0 - m, 12)


def load_state_dict(source: Any) -> dict[str, np.ndarray]:
  """Reads a flat state dict as NumPy arrays.

  Args:
    source: a mapping of name to array (torch tensors, NumPy or JAX arrays),
      or a path to a ``.npz``, ``.safetensors`` or torch ``.pt``/``.pth``
      file. Torch files are loaded with ``weights_only=True``.

  Returns:
    ``{name: np.ndarray}``.
  """
  if isinstance(source, Mapping):
    return {str(k): _to_numpy(v) for k, v in source.items()}
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(
      'load_state_dict: expected a mapping of arrays or a file '
      f'path, got {type(source).__name__}'
    )
  path = pathlib.Path(source)
  suffix = path.suffix.lower()
  if suffix == '.npz':
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if suffix == '.safetensors':
    from safetensors.numpy import load_file

    return load_file(str(path))
  if suffix in ('.pt', '.pth', '.bin'):
    import torch

    sd = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(sd, Mapping):
      raise TypeError(
        f'load_state_dict: {path} holds a {type(sd).__name__}, '
        'not a state dict; save model.state_dict()'
      )
    return load_state_dict(sd)
  raise ValueError(
    f'load_state_dict: unknown file type {suffix!r} for {path}; '
    'use .npz, .safetensors, .pt or .pth'
  )


def bn_prefixes(state_dict: Any) -> list[str]:
  """Prefixes (``'layer1.0.bn1'``) of the BatchNorm layers in a state dict."""
  sd = load_state_dict(state_dict)
  return sorted(
    k[: -len('.running_mean')] if k != 'running_mean' else ''
    for k in sd
    if k.endswith('running_mean')
  )


def from_torch(
  state_dict: Any,
  layers: Mapping[str, Any] | None = None,
  *,
  dtype: Any = jnp.float32,
) -> dict[str, dict]:
  """Converts torch BatchNorm state to Flax variables.

  Args:
    state_dict: a whole model's state dict (see :func:`load_state_dict` for
      the accepted forms). Keys that are not BatchNorm state are ignored.
    layers: maps torch layer prefixes (``'layer1.0.bn1'``) to Flax module
      paths (``'layer1_0/bn1'`` or ``('layer1_0', 'bn1')``). None converts
      every BatchNorm layer found, with the path taken from the prefix
      (dots become levels).
    dtype: dtype of the returned arrays (float32; keep stats >= float32).

  Returns:
    ``{'params': {...}, 'batch_stats': {...}}`` nested by module path, ready
    to merge into a Flax model's variables. An affine-free torch layer
    (``affine=False``) gives no params entry.
  """
  sd = load_state_dict(state_dict)
  if layers is None:
    layers = {p: p for p in bn_prefixes(sd)}
    if not layers:
      raise ValueError(_NO_LAYERS)
  out: dict[str, dict] = {'params': {}, 'batch_stats': {}}
  for prefix, path in layers.items():
    keys = _layer_keys(prefix)
    if keys['running_mean'] not in sd or keys['running_var'] not in sd:
      raise KeyError(
        f'from_torch: no {keys["running_mean"]!r} / {keys["running_var"]!r}'
        f' in the state dict; BatchNorm prefixes found: {bn_prefixes(sd)}'
      )
    tree = _split(path)
    for torch_name, flax_name in _STATS.items():
      _put(
        out['batch_stats'],
        tree,
        flax_name,
        jnp.asarray(sd[keys[torch_name]], dtype),
      )
    for torch_name, flax_name in _PARAMS.items():
      if keys[torch_name] in sd:
        _put(
          out['params'],
          tree,
          flax_name,
          jnp.asarray(sd[keys[torch_name]], dtype),
        )
  return out


def to_torch(
  variables: Mapping[str, Any],
  layers: Mapping[str, Any],
  *,
  num_batches_tracked: int = 0,
) -> dict[str, np.ndarray]:
  """Converts Flax variables of BatchNorm layers to torch state-dict entries.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a Flax model.
    layers: maps torch prefixes to Flax module paths, as in
      :func:`from_torch`.
    num_batches_tracked: the value to store (Flax does not count batches).

  Returns:
    ``{'<prefix>.weight': ..., ...}`` as float32 NumPy arrays, and
    ``num_batches_tracked`` as int64, ready for ``torch.from_numpy`` and
    ``load_state_dict(..., strict=False)``.
  """
  out = {}
  for prefix, path in layers.items():
    keys = _layer_keys(prefix)
    tree = _split(path)
    stats = _get(variables.get('batch_stats', {}), tree, 'batch_stats')
    for torch_name, flax_name in _STATS.items():
      out[keys[torch_name]] = np.asarray(stats[flax_name], np.float32)
    params = _get(variables.get('params', {}), tree, None) or {}
    for torch_name, flax_name in _PARAMS.items():
      if flax_name in params:
        out[keys[torch_name]] = np.asarray(params[flax_name], np.float32)
    out[keys['num_batches_tracked']] = np.asarray(num_batches_tracked, np.int64)
  return out


def nchw_to_nhwc(x: Any) -> Any:
  """Moves the channel axis of an N C ... array from 1 to last."""
  return jnp.moveaxis(jnp.asarray(_to_numpy(x)), 1, -1)


def nhwc_to_nchw(x: Any) -> Any:
  """Moves the channel axis of an N ... C array from last to 1."""
  return jnp.moveaxis(jnp.asarray(x), -1, 1)


def conv_kernel_from_torch(w: Any) -> jax.Array:
  """torch conv weight (O, I, *spatial) to a Flax kernel (*spatial, I, O)."""
  w = _to_numpy(w)
  return jnp.asarray(np.moveaxis(w, (0, 1), (-1, -2)))


def dense_kernel_from_torch(w: Any) -> jax.Array:
  """torch Linear weight (out, in) to a Flax Dense kernel (in, out)."""
  return jnp.asarray(_to_numpy(w).T)


def _layer_keys(prefix: str) -> dict[str, str]:
  dot = f'{prefix}.' if prefix else ''
  return {k: dot + k for k in TORCH_KEYS}


def _split(path) -> tuple[str, ...]:
  if isinstance(path, str):
    parts = tuple(p for p in path.replace('.', '/').split('/') if p)
  else:
    parts = tuple(str(p) for p in path)
  if not parts:
    raise ValueError(
      f'bnjax.interop: empty Flax module path {path!r}; name '
      'the module, e.g. "BatchNorm_0"'
    )
  return parts


def _put(root: dict, tree: Sequence[str], name: str, value) -> None:
  node = root
  for p in tree:
    node = node.setdefault(p, {})
  node[name] = value


def _get(root, tree: Sequence[str], collection: str | None):
  node = root
  for p in tree:
    if p not in node:
      if collection is None:
        return None
      raise KeyError(
        f'to_torch: no {"/".join(tree)!r} in the {collection} '
        f'collection; it has {sorted(node)}'
      )
    node = node[p]
  return node


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, 'detach'):  # a torch tensor; no torch import needed
    # .numpy() shares the tensor's memory, and JAX may alias NumPy memory on
    # CPU: copy, or torch's in-place running-stat updates would leak into
    # the converted arrays.
    return v.detach().cpu().numpy().copy()
  return np.asarray(v)
