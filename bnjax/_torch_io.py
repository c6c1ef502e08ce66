"""The one path of PyTorch BatchNorm state into and out of bnjax.

:mod:`bnjax.interop` (Flax variables) and :mod:`bnjax.equinox` (a model and
its ``eqx.nn.State``) are adapters over these functions: the torch keys of
a layer, its state read from a state dict and validated, written back as
owned float32 copies, and the module paths of ``layers``. Every value goes
through the converters' one value check (:mod:`bnjax._values`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import jax
import numpy as np

from bnjax import _values
from bnjax._scalar_checks import is_int

TORCH_KEYS = (
  'weight',
  'bias',
  'running_mean',
  'running_var',
  'num_batches_tracked',
)
AFFINE = ('weight', 'bias')
STATS = ('running_mean', 'running_var')


def layer_keys(prefix: str) -> dict[str, str]:
  """``{torch name: state-dict key}`` of the layer at ``prefix``."""
  dot = f'{prefix}.' if prefix else ''
  return {k: dot + k for k in TORCH_KEYS}


def bn_prefixes(sd: Mapping[str, Any]) -> list[str]:
  """The sorted prefixes with a ``<prefix>.running_mean`` key."""
  # 'encoder.ema_running_mean' is some other module's buffer, not a layer.
  return sorted(
    k[: -len('.running_mean')] if k != 'running_mean' else ''
    for k in sd
    if k == 'running_mean' or k.endswith('.running_mean')
  )


def every_layer(fn: str, sd: Mapping[str, Any]) -> dict[str, str]:
  """``layers=None``: every BatchNorm layer, its path its prefix."""
  layers = {p: p for p in bn_prefixes(sd)}
  if not layers:
    raise ValueError(
      f'{fn}: found no BatchNorm layer (a "running_mean" key) in state_dict; '
      'pass the state dict of a model with BatchNorm layers, or name them in '
      '`layers`'
    )
  return layers


def check_prefix_types(
  fn: str, prefixes: Collection[Any], *, none_ok: bool = True
) -> None:
  """The keys of ``layers`` are strings: an int 0 would write (or read)
  the keys of a torch module at the top, ``'running_mean'``. Empty
  ``layers`` would convert nothing, silently: refused. ``none_ok``: whether
  ``fn`` takes ``layers=None`` (every layer), which the message offers."""
  if not prefixes:
    every = 'pass layers=None for every BatchNorm layer, or ' if none_ok else ''
    raise ValueError(
      f'{fn}: layers is empty, so nothing would be converted; {every}name '
      "the layers to convert, e.g. {'bn1': 'bn1'}"
    )
  bad = [p for p in prefixes if not isinstance(p, str)]
  if bad:
    raise TypeError(
      f'{fn}: the torch prefixes (keys of layers) must be strings, got '
      f'{bad[:5]!r}; pass e.g. {{{str(bad[0])!r}: ...}} (empty: the top)'
    )


def check_prefixes(fn: str, sd: Mapping[str, Any], prefixes) -> None:
  """Every prefix in ``layers`` has BatchNorm state (a KeyError if not)."""
  check_prefix_types(fn, prefixes)
  missing = [p for p in prefixes if layer_keys(p)['running_mean'] not in sd]
  if missing:
    raise KeyError(
      f'{fn}: state_dict has no BatchNorm state for the prefixes {missing} '
      f'in layers (no <prefix>.running_mean key); BatchNorm prefixes found: '
      f'{bn_prefixes(sd)}'
    )


def layer_problems(
  sd: Mapping[str, Any],
  prefix: str,
  *,
  affine: bool | None = None,
  size: int | None = None,
  complex_ok: bool = True,
  dtypes: Mapping[str, Any] | None = None,
) -> list[str]:
  """What is wrong with one torch BatchNorm layer's state (empty if valid):
  the torch keys here, the values by the one value check.

  Args:
    sd: the state dict (or the entries about to be written).
    prefix: the layer's prefix.
    affine: whether the target layer has ``weight`` and ``bias`` (None:
      either); the state dict must then have them, or not have them.
    size: the target layer's number of channels, if known.
    complex_ok: whether the running mean may be complex.
    dtypes: ``{torch name: dtype}`` the values are converted to, where
      known (a finite value past its range is refused: it would be inf).
  """
  keys = _present(sd, prefix)
  problems = []
  have = [n for n in AFFINE if n in keys]
  if len(have) == 1:
    k = layer_keys(prefix)
    problems.append(
      f'{k[have[0]]!r} is present but {k[({*AFFINE} - {*have}).pop()]!r} is '
      'missing: an affine torch BatchNorm has both, affine=False neither'
    )
  elif affine is not None and bool(have) != affine:
    problems.append(
      _AFFINE_MISMATCH[affine].format(*layer_keys(prefix).values())
    )
  if 'running_var' not in keys:
    return problems + [f'{layer_keys(prefix)["running_var"]!r} is missing']
  vectors = {keys[n]: sd[keys[n]] for n in (*AFFINE, *STATS) if n in keys}
  return problems + _values.layer_problems(
    vectors,
    variances=(keys['running_var'],),
    complex_ok=(keys['running_mean'],) if complex_ok else (),
    size=size,
    dtypes=None
    if dtypes is None
    else {keys[n]: d for n, d in dtypes.items() if n in keys},
  )


_AFFINE_MISMATCH = {
  True: (
    '{0!r} and {1!r} are missing (a torch BatchNorm with affine=False), but '
    'the layer has a weight and bias; build it with channelwise_affine=False'
  ),
  False: (
    '{0!r} and {1!r} are present, but the layer has no weight and bias; '
    'build it with channelwise_affine=True (loading would drop them)'
  ),
}


def _present(sd: Mapping[str, Any], prefix: str) -> dict[str, str]:
  return {n: k for n, k in layer_keys(prefix).items() if k in sd}


def read_layer(sd: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  """``{torch name: array}`` of a validated layer (weight, bias where
  present, running_mean, running_var), copies that own their memory.

  A copy, because ``jnp.asarray`` of an aligned NumPy array may alias it on
  CPU: a later change to the source (torch training on, a reused buffer)
  would change the converted JAX arrays.
  """
  keys = _present(sd, prefix)
  return {
    n: np.array(sd[keys[n]], copy=True) for n in (*AFFINE, *STATS) if n in keys
  }


def batch_counts(
  fn: str,
  num_batches_tracked: Any,
  prefixes: Collection[str],
  *,
  none_ok: bool = True,
) -> Mapping[str, int]:
  """``num_batches_tracked`` (an int, or ``{prefix: int}``) by prefix;
  ``none_ok`` as for :func:`check_prefix_types`."""
  check_prefix_types(fn, prefixes, none_ok=none_ok)
  counts: Mapping[str, Any] = (
    num_batches_tracked
    if isinstance(num_batches_tracked, Mapping)
    else dict.fromkeys(prefixes, num_batches_tracked)
  )
  for prefix, n in counts.items():
    # torch stores it as int64.
    if not is_int(n, at_least=0) or n >= 2**63:
      raise TypeError(
        f'{fn}: num_batches_tracked must be an int >= 0 and < 2**63 (torch '
        f'stores an int64), or a mapping of them by prefix, got {n!r} for '
        f'{prefix!r}'
      )
  unknown = sorted(map(str, set(counts) - set(prefixes)))
  if unknown:
    raise ValueError(
      f'{fn}: num_batches_tracked has counts for {unknown[:5]}, no layer '
      f'converted here (the prefixes are {sorted(prefixes)[:5]}); a typo '
      'would write 0. Pass the counts of these layers only, e.g. '
      '{p: n for p, n in counts.items() if p in prefixes}'
    )
  return counts


def check_concrete(fn: str, tree: Any, what: str) -> None:
  """``tree`` holds no traced array: the entries are NumPy arrays, read
  from concrete values (under ``jax.jit``, ``vmap`` or ``grad`` NumPy's
  conversion fails with a bare TracerArrayConversionError)."""
  if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(tree)):
    raise TypeError(
      f'{fn}: {what} holds traced arrays (a call inside jax.jit, vmap or '
      'grad); the torch state dict is NumPy arrays of concrete values: '
      'call it outside the transformation, on its results'
    )


def write_layers(
  fn: str,
  layers: Mapping[str, Mapping[str, Any]],
  counts: Mapping[str, int],
  what: str,
  sizes: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
  """Torch state-dict entries of ``{prefix: {torch name: array}}``.

  Every layer is validated first (real, finite, variances >= 0, one length,
  ``weight`` and ``bias`` together), all problems reported at once naming
  the torch keys of ``what``. The arrays are float32 copies that own their
  memory (``np.asarray`` of a JAX array can be a read-only view of the JAX
  buffer, and torch's in-place updates must never reach the JAX arrays);
  ``num_batches_tracked`` is int64, ``counts.get(prefix, 0)``.
  """
  out: dict[str, np.ndarray] = {}
  problems: list[str] = []
  for prefix, vectors in layers.items():
    keys = layer_keys(prefix)
    entries = {keys[n]: v for n, v in vectors.items()}
    size = None if sizes is None else sizes[prefix]
    found = layer_problems(
      entries,
      prefix,
      size=size,
      complex_ok=False,
      dtypes=dict.fromkeys(vectors, np.float32),
    )
    problems += found
    if not found:
      out.update(
        {k: np.array(v, np.float32, copy=True) for k, v in entries.items()}
      )
    out[keys['num_batches_tracked']] = np.array(counts.get(prefix, 0), np.int64)
  _values.report(fn, problems, what)
  return out


def split_path(path: Any, prefix: str, fn: str, what: str) -> tuple:
  """A module path of ``layers`` as a tuple of keys.

  A string splits at '/' and '.'; its all-digit parts become ints, the
  index of a layer in a list (torch's ``ModuleList``/``Sequential``, nnx's
  and Equinox's lists alike). A tuple is taken as it is (strings and ints),
  so a linen module literally named '0' is ``('0',)``. An int is one index.
  ``what``: the kind of path in the message ("Flax", "Equinox").
  """
  if isinstance(path, str):
    parts: tuple[str | int, ...] = tuple(
      int(p) if p.isdigit() else p
      for p in path.replace('.', '/').split('/')
      if p
    )
  elif is_int(path):
    parts = (int(path),)
  elif isinstance(path, (tuple, list)) and all(
    isinstance(p, str) or is_int(p) for p in path
  ):
    parts = tuple(p if isinstance(p, str) else int(p) for p in path)
  else:
    raise TypeError(
      f'{fn}: the {what} path of {prefix!r} must be a string '
      f'("layer1/0/bn1"), an int or a tuple of strings and ints, got '
      f'{type(path).__name__} {path!r} in layers'
    )
  if not parts:
    raise ValueError(
      f'{fn}: empty {what} module path {path!r} for {prefix!r} in layers; '
      'name the module, e.g. "BatchNorm_0"'
    )
  return parts
