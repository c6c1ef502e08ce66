"""Reading a flat state dict: a mapping of arrays or a state-dict file.

:func:`load_state_dict` (re-exported as ``bnjax.interop.load_state_dict``)
turns a mapping of torch tensors, NumPy or JAX arrays, or a ``.npz``,
``.safetensors`` or torch ``.pt``/``.pth`` file, into ``{name: np.ndarray}``,
with an error naming the key or the path for anything that is not a
numeric array. The conversion of BatchNorm state is in ``bnjax.interop``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnjax._torch_layout import to_numpy

_FN = 'bnjax.interop.load_state_dict'


def load_state_dict(source: Any) -> dict[str, np.ndarray]:
  """Reads a flat state dict as NumPy arrays.

  Args:
    source: a mapping of name to array (torch tensors, NumPy or JAX arrays),
      or a path to a ``.npz``, ``.safetensors`` or torch ``.pt``/``.pth``
      file. Torch files are loaded with ``weights_only=True``.

  Returns:
    ``{name: np.ndarray}``.

  Raises:
    TypeError: ``source`` is neither a mapping nor a path, or a torch file
      holds something other than a state dict.
    ValueError: an unknown file suffix.

  Example:
    >>> import os, tempfile, numpy as np
    >>> from bnjax import interop
    >>> path = os.path.join(tempfile.mkdtemp(), 'bn.npz')
    >>> np.savez(path, **{'bn.running_mean': np.zeros(2)})
    >>> interop.load_state_dict(path)
    {'bn.running_mean': array([0., 0.])}
  """
  if isinstance(source, Mapping):
    return {str(k): _array(k, v) for k, v in source.items()}
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(
      f'{_FN}: source must be a mapping of arrays or '
      f'a file path, got {type(source).__name__}'
    )
  path = pathlib.Path(source)
  suffix = path.suffix.lower()
  if suffix not in ('.npz', '.safetensors', '.pt', '.pth', '.bin'):
    raise ValueError(
      f'{_FN}: unknown file type {suffix!r} for source '
      f'{path}; '
      'use .npz, .safetensors, .pt or .pth'
    )
  if not path.is_file():
    raise FileNotFoundError(f'{_FN}: no file {path} (source)')
  try:
    sd = _read(path, suffix)
  except Exception as e:  # a truncated, empty or foreign file
    raise ValueError(
      f'{_FN}: cannot read {path} as a {suffix} state dict '
      f'({type(e).__name__}: {e}); is the file complete, and was it '
      'written by np.savez, safetensors or torch.save(model.state_dict())?'
    ) from e
  if not isinstance(sd, Mapping):
    raise TypeError(
      f'{_FN}: {path} holds a {type(sd).__name__}, '
      'not a state dict; save model.state_dict()'
    )
  try:
    return load_state_dict(sd)
  except (TypeError, ValueError) as e:
    raise type(e)(f'{e} (in {path})') from None


def _read(path: pathlib.Path, suffix: str):
  if suffix == '.npz':
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if suffix == '.safetensors':
    from safetensors.numpy import load_file

    return load_file(str(path))
  import torch

  return torch.load(path, map_location='cpu', weights_only=True)


def _array(key, value) -> np.ndarray:
  """One state-dict entry as a NumPy array, or an error naming its key."""
  if isinstance(value, Mapping):
    raise TypeError(
      f'{_FN}: in source, the entry {key!r} is itself a mapping (keys '
      f'{sorted(map(str, value))[:4]}...), not an array: a checkpoint that '
      f'nests the state dict (Lightning, a training loop); pass '
      f'checkpoint[{key!r}]'
    )
  layout = str(getattr(value, 'layout', 'torch.strided'))
  if getattr(value, 'is_meta', False) or layout != 'torch.strided':
    kind = 'a meta tensor (no data)' if layout == 'torch.strided' else layout
    raise TypeError(
      f'{_FN}: in source, the entry {key!r} is {kind}; pass a dense tensor '
      '(for example tensor.to_dense(), or load real weights first)'
    )
  try:
    arr = to_numpy(value)
  except Exception as e:
    raise TypeError(
      f'{_FN}: in source, the entry {key!r} '
      f'({type(value).__name__}) is not an array: {e}'
    ) from None
  if arr.dtype.kind not in 'biufc':
    raise TypeError(
      f'{_FN}: in source, the entry {key!r} has dtype {arr.dtype} '
      f'({type(value).__name__}); state-dict entries must be numeric arrays'
    )
  return arr
