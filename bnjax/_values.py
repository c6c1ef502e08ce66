"""The one value check of every conversion into or out of bnjax.

PyTorch (:mod:`bnjax.interop`, :mod:`bnjax.equinox`), Haiku and flax.nnx
conversions hand each layer's per-channel vectors here by name, in both
directions, so a NaN mean or a negative variance is refused the same way
whichever format it comes from or goes to: every problem of every layer is
listed, naming its key and channels, and nothing is converted.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np


def layer_problems(
  vectors: Mapping[str, Any],
  *,
  variances: Collection[str] = (),
  positive: Collection[str] = (),
  complex_ok: Collection[str] = (),
  size: int | None = None,
  dtypes: Mapping[str, Any] | None = None,
) -> list[str]:
  """What is wrong with one layer's vectors (empty if they are valid).

  Args:
    vectors: ``{key as the message names it: array}`` of one layer.
    variances: the keys that must be >= 0.
    positive: the keys that must be > 0 (a standard deviation).
    complex_ok: the keys that may be complex (a mean).
    size: the number of channels they must have, if known.
    dtypes: ``{key: dtype}`` the vectors are converted to, where known: a
      finite value past its range would become inf there.

  Returns:
    One line per problem, each naming its key.
  """
  problems: list[str] = []
  arrays = {}
  for k, v in vectors.items():
    a = np.asarray(v)
    if a.dtype.kind not in 'iufc':  # a bool is a mask or a flag, not state
      problems.append(
        f'{k!r} is not a numeric array (got {type(v).__name__} of dtype '
        f'{a.dtype})'
      )
    elif a.dtype.kind == 'c' and k not in complex_ok:
      problems.append(
        f'{k!r} is complex; '
        + ('only a mean may be complex' if complex_ok else 'this state is real')
      )
    else:
      arrays[k] = a
  shapes = {k: a.shape for k, a in arrays.items()}
  lengths = {s[0] for s in shapes.values() if len(s) == 1}
  if any(len(s) != 1 for s in shapes.values()) or len(lengths) > 1:
    return problems + [
      f'{", ".join(map(repr, shapes))} must be 1-D vectors of one length '
      f'(the channels), got shapes {shapes}'
    ]
  if size is not None and lengths and lengths != {size}:
    return problems + [
      f'{", ".join(map(repr, shapes))} have {lengths.pop()} channels, but '
      f'the layer has {size}'
    ]
  for k, a in arrays.items():
    bad = ~np.isfinite(a)
    if bad.any():
      problems.append(f'{k!r} has non-finite values at channels {_at(bad)}')
    elif k in variances and a.dtype.kind != 'c' and (a < 0).any():
      problems.append(
        f'{k!r} is negative at channels {_at(a < 0)}; a variance must be >= 0'
      )
    elif k in positive and (a <= 0).any():
      problems.append(
        f'{k!r} is <= 0 at channels {_at(a <= 0)}; a standard deviation '
        'must be > 0'
      )
    elif dtypes is not None and k in dtypes:
      problems += _overflow(k, a, np.dtype(dtypes[k]))
  return problems


def _overflow(k: str, a: np.ndarray, dtype: np.dtype) -> list[str]:
  """A finite value that the conversion to ``dtype`` would make inf."""
  if dtype.kind != 'f' or a.dtype.kind == 'c':  # a complex mean stays wide
    return []
  top = float(np.finfo(dtype).max)
  big = np.abs(a) > top
  if not big.any():
    return []
  return [
    f"{k!r} has values past {dtype.name}'s range (|v| <= {top:.4g}) at "
    f'channels {_at(big)}: {a[big][:5].tolist()}; they would become inf. '
    'Convert to a wider dtype, or rescale the layer'
  ]


def report(fn: str, problems: list[str], what: str) -> None:
  """Raises the ValueError that lists ``problems``, if there are any."""
  if problems:
    raise ValueError(
      f'{fn}: invalid BatchNorm state in {what}; nothing was converted:'
      '\n  ' + '\n  '.join(problems)
    )


def check_layer(fn: str, what: str, vectors: Mapping[str, Any], **kw) -> None:
  """:func:`layer_problems` of one layer, raised by :func:`report`."""
  report(fn, layer_problems(vectors, **kw), what)


def _at(bad: np.ndarray) -> list[int]:
  return np.flatnonzero(bad)[:5].tolist()
