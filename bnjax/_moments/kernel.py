r"""Exact per-channel moments in one read of x: a Pallas kernel (opt-in).

The accelerator path of :mod:`bnjax._moments.local` reads x twice (the
pivot's refinement, then the sums around the refined shift), and XLA's
fusions of a one-read tiling cost more than the read they save
(``benchmarks/_tiled.py``). This kernel keeps a tile of rows on chip and
takes its exact moments there, so x leaves HBM once:

1. *A tile, on chip.* x is viewed as ``(rows, C)`` (the reduced axes
   leading, the features trailing: a bitcast), and a grid walks tiles of
   ``TR`` = :data:`TILE_ROWS` = 256 rows by channel blocks of 128 lanes (or all
   C when C < 128). Half-precision input is upcast to float32 on chip.
   The tile's pivot p is the median of its first, middle and last rows (a
   single outlier is never the pivot), :math:`K = p + \sum (x - p) / n_t`,
   and with :math:`d = x - K`, :math:`s_1 = \sum d` and
   :math:`M_2 = \sum d^2 - s_1^2 / n_t` (the corrected two-pass). Out: one
   :class:`local.Partial` per tile, ``(count, K, s1, M2)`` of shape
   ``(tiles, C)``.
2. *The merge, in XLA.* :func:`combine.merge` (exact: the tiles' means enter
   as deviations from a common reference), in levels of at most
   ``local.BLOCK`` tiles, the same blocking as :func:`local.blocked_sums`.

**The error bound, for any summation order.** A tile's sums are of at most
``TR`` = 256 values, so their relative error is at most
:math:`\gamma_t = (TR - 1) u = 1.5 \cdot 10^{-5}` (u = 2^{-24}) in any order
the backend picks. The pivot is one of the tile's values, within
:math:`\sqrt{TR - 1}\,\sigma_t` of the tile's mean (Samuelson), so
:math:`|K - \mu_t| \le \gamma_t (1 + \sqrt{TR})\,\sigma_t \le 2.6 \cdot
10^{-4} \sigma_t` whatever |mean|/std is, and by local.py's argument the
tile's :math:`M_2` is within :math:`1.7 \gamma_t` of exact. The merge's sums
over T tiles are blocked in levels of :math:`B_l \le 512` tiles, a relative
error of :math:`\gamma_m = \sum_l (B_l - 1) u` on non-negative terms around
a reference within float32's rounding of the mean (the tiles' shifts differ
by less than their size, so their differences are exact); the variance's
relative error is then at most :math:`1.7 (\gamma_t + \gamma_m)`:
:math:`1.7 (255 + 510) u = 7.8 \cdot 10^{-5}` up to :math:`n = 2^{24}`
(65536 tiles, two levels of 256; local.py's two reads: :math:`1.7 \cdot
979 u`), about 1e-7 in practice: tests/core/test_kernel.py checks 1e-6
against float64 on the numerics layouts (|mean|/std 0 to 1e6, sorted, an
outlier first, means 0.1% apart).

**Where it applies.** No mask, float32, bfloat16 or float16 input, features
trailing (the ``(rows, C)`` view is a bitcast), C a multiple of 128 or a
multiple of 8 below 128, and at least ``TR`` rows; elsewhere
:func:`local.exact_partial` runs (the XLA path), with the same results to
float32 rounding.

**Backends.** The call is chosen when the program is lowered, one lowering
rule per platform (a program exported for several platforms at once
carries each one's). TPU: Mosaic TPU (it exports for 'tpu' on a CPU-only
machine; tests/core/test_kernel.py checks the ``tpu_custom_call``). GPU:
Pallas's Triton backend (deprecated since JAX 0.11; its custom call has no
export stability guarantee, so ``jax.export`` needs
``DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')``). Mosaic GPU
refuses this kernel as written (jax 0.10.2: "Incompatible FragmentedArray
layouts" for the axis-0 sums of a (256, 128) tile, and 64 channels are not
a multiple of 128 elements). Where Triton cannot lower (JAX >= 0.12 without
a visible GPU), the same tile partials lower as XLA ops. CPU: interpret mode.

**Selecting it.** ``BNJAX_STATS_KERNEL=pallas`` (read once at import; empty,
the default, keeps the XLA path) runs it on the accelerator path, in the
``lax.platform_dependent`` default branch; with ``BNJAX_STATS_PATH=
accelerator`` it runs on the CPU too, in Pallas's interpret mode. It stays
opt-in until a device run shows it faster (issue 40). Synced statistics
take each shard's partial from it (:func:`layer_partial`) before the
merge across shards; inside ``shard_map`` the tile moments are typed
varying as the shard's x, and on the CPU they lower as XLA ops there
(Pallas's interpreter fails shard_map's type check on the kernel body).

**Derivatives.** A Pallas call has no autodiff rule; :func:`layer_partial`
has a ``custom_jvp`` that holds the shift K constant (a reference), so
:math:`ds_1 = \sum dx` and :math:`dM_2 = 2(\sum (x - K)\, dx - s_1/n
\sum dx)`: linear in dx (JAX transposes it for reverse mode), and the mean
:math:`K + s_1/n` and variance :math:`M_2/n` get the XLA path's tangents,
:math:`d\mu = \langle dx \rangle` and :math:`d\sigma^2 = 2 \langle (x -
\mu)\, dx \rangle`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jax_core
from jax.interpreters import batching, mlir
from jax.sharding import PartitionSpec

from bnjax._moments import collectives, combine, local
from bnjax._types import Layout

Array = jax.Array

KERNELS = ('', 'pallas')
_kernel = os.environ.get('BNJAX_STATS_KERNEL', '')
if _kernel not in KERNELS:
  raise ValueError(
    f'bnjax: BNJAX_STATS_KERNEL={_kernel!r} must be one of {KERNELS} (empty, '
    "the default: the XLA path; 'pallas': the one-read Pallas kernel on the "
    'accelerator path); unset it or set it to pallas'
  )
SELECTED = _kernel == 'pallas'

# The same on every platform (the primitive's output shape, the number of
# tiles, is fixed before a platform is chosen): 128 KiB of float32 at 128
# lanes, which a TPU's VMEM double-buffers and Triton holds at 8 warps.
TILE_ROWS = 256
LANES = 128
F32 = jnp.dtype(jnp.float32)

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype('float16'))


def applies(x: Array, lay: Layout, mask: Array | None, rows: int) -> bool:
  """Whether the kernel takes this input (else the XLA path runs)."""
  f = len(lay.feature_axes)
  c = math.prod(lay.feature_shape)
  return (
    mask is None
    and jnp.dtype(x.dtype) in DTYPES
    and lay.feature_axes == tuple(range(x.ndim - f, x.ndim))
    and (c % LANES == 0 or (c < LANES and c % 8 == 0))
    and lay.count >= rows
  )


def moments(
  x: Array, lay: Layout, mask: Array | None = None, *, rows: int = TILE_ROWS
) -> tuple[Array, Array, Array, Array]:
  """``(count, mean, biased var, mean_lo)``, as the engine's accelerator
  path returns them, from :func:`layer_partial`. x in its own dtype."""
  p = layer_partial(x, lay, mask, rows=rows)
  return (p.count, *local.finalize_lo(p))


def layer_partial(
  x: Array, lay: Layout, mask: Array | None = None, *, rows: int = TILE_ROWS
) -> local.Partial:
  """x's exact :class:`local.Partial` (a shard's, before a synced merge),
  by the kernel where it applies (one read of x, the module docstring) and
  by :func:`local.exact_partial` elsewhere. x in its own dtype."""
  if not applies(x, lay, mask, rows):
    return local.exact_partial(x.astype(local.stats_dtype(x.dtype)), lay, mask)
  c = math.prod(lay.feature_shape)
  shift, s1, m2 = _partial_2d(x.reshape(lay.count, c), rows)  # a bitcast
  feat = lay.feature_shape
  count = jnp.asarray(lay.count, jnp.float32)
  return local.Partial(count, *(v.reshape(feat) for v in (shift, s1, m2)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _partial_2d(x2: Array, rows: int) -> tuple[Array, Array, Array]:
  p = partial(x2, rows)
  return p.shift, p.s1, p.m2


@_partial_2d.defjvp
def _partial_2d_jvp(rows, primals, tangents):
  # Calls itself for the primal, so that the tangent is differentiable
  # again (second order) with no Pallas call under autodiff. The shift is a
  # reference, held constant: s1 = sum(x - K) and M2 = sum((x - K)**2) -
  # s1**2 / n have the tangents below, and the mean K + s1 / n and the
  # variance M2 / n get theirs through local.finalize_lo (or the merge).
  (x2,), (dx,) = primals, tangents
  shift, s1, m2 = _partial_2d(x2, rows)
  k = lax.stop_gradient(shift)
  xf, dxf = x2.astype(jnp.float32), dx.astype(jnp.float32)
  ds1 = jnp.sum(dxf, 0)
  dm2 = 2.0 * (jnp.sum((xf - k) * dxf, 0) - s1 / x2.shape[0] * ds1)
  return (shift, s1, m2), (jnp.zeros_like(shift), ds1, dm2)


def partial(x2: Array, rows: int = TILE_ROWS) -> local.Partial:
  """The merged :class:`local.Partial` of a ``(R, C)`` array's columns
  (count a scalar)."""
  parts = tile_partials(x2, rows)
  merged = _blocked_merge(parts)
  return merged._replace(count=jnp.asarray(x2.shape[0], jnp.float32))


def tile_partials(x2: Array, rows: int = TILE_ROWS) -> local.Partial:
  """One :class:`local.Partial` per tile of ``rows`` rows: count ``(T,)``,
  shift, s1 and m2 ``(T, C)`` (the last tile may be short)."""
  tiles = -(-x2.shape[0] // rows)
  out = _tiles_p.bind(x2, rows=rows)
  count = np.full(tiles, rows, np.float32)
  count[-1] = x2.shape[0] - (tiles - 1) * rows
  return local.Partial(jnp.asarray(count), *(o[:, 0, :] for o in out))


# The Pallas call is chosen per platform when the program is lowered (one
# lowering rule each), not by lax.platform_dependent: a conditional's kept
# branches are lowered for every platform of the module, and a Pallas call
# with one backend's compiler parameters fails the others' lowering, so a
# program exported for ('cuda', 'tpu') at once could not take the kernel.
_tiles_p = jax_core.Primitive('bnjax_tile_moments')
_tiles_p.multiple_results = True


@_tiles_p.def_abstract_eval
def _tiles_abstract(x2, *, rows):
  shape = (-(-x2.shape[0] // rows), 1, x2.shape[1])
  # update keeps x2's mesh and varying axes (shard_map's check_vma: the
  # per-shard moments vary as the shard's x does), unsharded within it.
  stat = x2.update(shape=shape, dtype=F32, weak_type=False)
  sharding = getattr(x2, 'sharding', None)
  if sharding is not None:
    stat = stat.update(sharding=sharding.update(spec=PartitionSpec()))
  return stat, stat, stat


def _stat_struct(x2, shape) -> jax.ShapeDtypeStruct:
  """The kernel's float32 output of ``shape``, varying over x2's mesh axes
  (Pallas needs that inside shard_map with check_vma)."""
  aval = jax.typeof(x2)
  mat = getattr(aval, 'manual_axis_type', None)
  if mat is not None:  # JAX >= 0.10
    return jax.ShapeDtypeStruct(shape, F32, manual_axis_type=mat)
  vma = getattr(aval, 'vma', None)
  if vma is not None:  # JAX 0.8 and 0.9
    return jax.ShapeDtypeStruct(shape, F32, vma=vma)  # type: ignore[call-arg]
  return jax.ShapeDtypeStruct(shape, F32)  # pragma: no cover


@_tiles_p.def_impl
def _tiles_eager(x2, *, rows):
  return jax.jit(lambda x: _tiles_p.bind(x, rows=rows))(x2)


def _tiles_batched(args, dims, *, rows):
  """vmap: the mapped axis joins the channels ((R, B * C): columns are
  independent)."""
  (x,), (d,) = args, dims
  x = jnp.moveaxis(x, d, 1)
  r, b, c = x.shape
  outs = _tiles_p.bind(x.reshape(r, b * c), rows=rows)
  outs = [jnp.moveaxis(o.reshape(o.shape[0], 1, b, c), 2, 0) for o in outs]
  return outs, [0, 0, 0]


batching.primitive_batchers[_tiles_p] = _tiles_batched


def _call(x2: Array, *, rows: int, how: str):
  from jax.experimental import pallas as pl

  r, c = x2.shape
  block = LANES if c % LANES == 0 else c
  grid = (-(-r // rows), c // block)
  last = r - (grid[0] - 1) * rows
  spec = pl.BlockSpec((1, 1, block), lambda i, j: (i, 0, j))
  params: Any = None
  if how == 'triton':
    from jax.experimental.pallas import triton as pltriton

    params = pltriton.CompilerParams(num_warps=8, num_stages=1)
  if how == 'tpu':
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel'))
  stat = _stat_struct(x2, (grid[0], 1, c))
  return pl.pallas_call(
    functools.partial(_tile_kernel, rows=rows, last=last, tiles=grid[0]),
    out_shape=(stat, stat, stat),
    grid=grid,
    in_specs=[pl.BlockSpec((rows, block), lambda i, j: (i, j))],
    out_specs=(spec, spec, spec),
    interpret=how == 'interpret',
    compiler_params=params,
    name='bnjax_tile_moments',
  )(x2)


def _gpu_lowering(ctx, x2, *, rows):
  """Triton where Pallas lowers it; else XLA's ops for the same partials.
  (JAX >= 0.12 lowers Triton only for a GPU it can see: a program exported
  for CUDA on a machine without one takes the XLA tiles.)"""
  try:
    return mlir.lower_fun(
      functools.partial(_call, how='triton'), multiple_results=True
    )(ctx, x2, rows=rows)
  except RuntimeError as e:
    if 'No supported GPU devices' not in str(e):
      raise
  return mlir.lower_fun(_xla_tiles, multiple_results=False)(ctx, x2, rows=rows)


def _cpu_lowering(ctx, x2, *, rows):
  """Interpret mode; inside shard_map (a shard's x typed varying) the same
  tiles as XLA ops, since Pallas's interpreter fails shard_map's check_vma
  on the kernel body's constants (jax 0.8 to 0.12)."""
  if collectives.aval_varying_axes(ctx.avals_in[0]):
    fun = mlir.lower_fun(_xla_tiles, multiple_results=True)
  else:
    fun = mlir.lower_fun(
      functools.partial(_call, how='interpret'), multiple_results=True
    )
  return fun(ctx, x2, rows=rows)


mlir.register_lowering(_tiles_p, _cpu_lowering, platform='cpu')
mlir.register_lowering(
  _tiles_p,
  mlir.lower_fun(functools.partial(_call, how='tpu'), multiple_results=True),
  platform='tpu',
)
for _platform in ('cuda', 'rocm'):
  mlir.register_lowering(_tiles_p, _gpu_lowering, platform=_platform)


def _tile_kernel(x_ref, k_ref, s1_ref, m2_ref, *, rows, last, tiles):
  """One tile's exact moments (the module docstring), on chip."""
  from jax.experimental import pallas as pl

  x = x_ref[...].astype(F32)
  p, p_last = _median_of_three(x_ref, rows), _median_of_three(x_ref, last)
  is_last = pl.program_id(0) == tiles - 1
  shift, s1, m2 = _tile_moments(x, 0, p, p_last, is_last, rows, last)
  k_ref[...] = shift[None]
  s1_ref[...] = s1[None]
  m2_ref[...] = m2[None]


def _tile_moments(x, axis, pivot, pivot_last, is_last, rows, last):
  """(K, s1, M2) of tiles of ``rows`` rows along ``axis`` of float32 x (its
  size ``rows``), the last tile holding ``last`` (its rows past them are
  garbage: they enter no sum). Kept dims."""
  n: Array | float = float(rows)
  valid = None
  if last != rows:
    pivot = jnp.where(is_last, pivot_last, pivot)
    n = jnp.where(is_last, jnp.float32(last), n)
    row = lax.broadcasted_iota(jnp.int32, x.shape, axis)
    valid = row < rows - is_last.astype(jnp.int32) * (rows - last)
    x = jnp.where(valid, x, pivot)  # x - pivot = 0 there
  shift = pivot + jnp.sum(x - pivot, axis, keepdims=True) / n
  d = x - shift
  if valid is not None:
    d = jnp.where(valid, d, 0.0)
  s1 = jnp.sum(d, axis, keepdims=True)
  m2 = jnp.maximum(jnp.sum(d * d, axis, keepdims=True) - s1 * s1 / n, 0.0)
  return shift, s1, m2


def _xla_tiles(x2: Array, *, rows: int):
  """The kernel's tile partials by XLA ops (x padded to whole tiles): what
  a GPU program lowers to where Pallas cannot lower the kernel."""
  r, c = x2.shape
  tiles = -(-r // rows)
  last = r - (tiles - 1) * rows
  x = jnp.pad(x2.astype(F32), ((0, tiles * rows - r), (0, 0)))
  x = x.reshape(tiles, rows, c)
  p, p_last = (
    _median3(x[:, :1], x[:, (k - 1) // 2][:, None], x[:, k - 1][:, None])
    for k in (rows, last)
  )
  is_last = lax.broadcasted_iota(jnp.int32, (tiles, 1, 1), 0) == tiles - 1
  return _tile_moments(x, 1, p, p_last, is_last, rows, last)


def _median_of_three(x_ref, n: int) -> Array:
  """The median of rows 0, (n - 1) // 2 and n - 1 (static), shape (1, C),
  loaded from the tile's buffer on chip."""
  return _median3(
    *(x_ref[i : i + 1, :].astype(F32) for i in (0, (n - 1) // 2, n - 1))
  )


def _median3(a: Array, b: Array, c: Array) -> Array:
  lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
  return jnp.maximum(lo, jnp.minimum(hi, c))


def _blocked_merge(parts: local.Partial) -> local.Partial:
  """:func:`combine.merge` of T stacked partials in levels of at most
  ``local.BLOCK`` (balanced, as :func:`local.blocked_sums`'s): groups of
  b partials (the last padded with empty ones, which weigh 0) merge into
  one each, until one is left."""
  count = jnp.broadcast_to(parts.count[:, None], parts.shift.shape)
  p = parts._replace(count=count)
  while p.shift.shape[0] > 1:
    t = p.shift.shape[0]
    b = min(local._level_size(t), t)
    g = -(-t // b)
    pad = ((0, g * b - t), (0, 0))
    p = local.Partial(*(jnp.pad(v, pad).reshape(g, b, -1) for v in p))
    p = combine.merge(p, axis=1)
  return local.Partial(*(v[0] for v in p))
