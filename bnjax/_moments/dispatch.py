"""Which statistics code runs where: the platform choice, in one place.

- **CPU, unsynced:** flax's formulas from plain sums (XLA:CPU reduces those
  fastest, and ordinary input gets flax's numbers bit for bit), replaced by
  the exact path in a ``lax.cond`` where some channel has
  ``mean**2 > 8 var``. On the CPU the host evaluates the predicate in place.
  Synced statistics take the exact path on every platform.
- **GPU, TPU and anything else:** the exact, branch-free path
  (``local.exact_partial``): a conditional there copies its predicate to the
  host and drains the stream, once per layer, and sibling reductions with a
  fused subtraction cost no extra read.

The choice is made when the program is lowered for a platform
(``lax.platform_dependent``), so one jitted or exported function carries
the right code for each. The environment variable ``BNJAX_STATS_PATH``
(private, for tests) forces one path everywhere: ``accelerator`` runs the
GPU/TPU path on the CPU, ``cpu`` the CPU path on any platform.
``BNJAX_STATS_KERNEL=pallas`` (opt-in) takes statistics on the GPU/TPU
path by the one-read Pallas kernel of :mod:`bnjax._moments.kernel`:
unsynced, each shard's partial before a synced merge, and each device's
shard wherever x's type shards it over Explicit mesh axes (a jit over a
sharded batch; channels over a model axis); not under a context mesh with
Auto axes, which the partitioner places (:func:`_auto_partitioned`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._moments import collectives, gather, kernel, local, psum
from bnjax._types import Layout

Array = jax.Array

PATHS = ('', 'cpu', 'accelerator')
_path = os.environ.get('BNJAX_STATS_PATH', '')
if _path not in PATHS:  # pragma: no cover
  raise ValueError(
    f'BNJAX_STATS_PATH={_path!r} must be one of {PATHS} (empty: by platform)'
  )


def forced_path() -> str:
  """'' (by platform), 'cpu' or 'accelerator'."""
  return _path


def on_platform(cpu: Callable[[], Any], accelerator: Callable[[], Any]):
  """``cpu()`` when lowered for the CPU, else ``accelerator()``."""
  if _path == 'accelerator':
    return accelerator()
  if _path == 'cpu':
    return cpu()
  return lax.platform_dependent(cpu=cpu, default=accelerator)


@dataclasses.dataclass(frozen=True)
class Sync:
  """How statistics combine over mapped axes (None: local statistics)."""

  axis_name: Any = None
  groups: Any = None
  mode: str = 'gather'  # 'gather' or 'psum' (psum.resolve)
  fn: str = 'bnjax.batch_norm'  # the public function, for error messages


LOCAL = Sync()


def batch_moments(
  x: Array,
  lay: Layout,
  mask: Array | None,
  *,
  fast: bool = True,
  sync: Sync = LOCAL,
) -> tuple[Array, Array, Array, Array]:
  """``(count, mean, biased var, mean_lo)`` of x over the (global) batch.

  ``count`` is a scalar, or per channel with a mask; statistics are at
  least float32; ``mean + mean_lo`` is the mean to twice the precision
  (``local.finalize_lo``; 0 where the float32 mean is all there is).
  """
  if jnp.iscomplexobj(x):
    return _complex_moments(x, lay, mask, fast, sync)
  xf = x.astype(local.stats_dtype(x.dtype))
  m = None if mask is None else jnp.broadcast_to(mask, x.shape)
  if sync.axis_name is None:
    stats = _local_stats if _traced(xf) else _local_stats_impl
  else:
    stats = functools.partial(_synced, sync=sync)
  if kernel.SELECTED:  # the kernel reads x in its own dtype, once
    shards = _kernel_over_shards(x, m, lay, sync)
    if shards is not None:
      return on_platform(lambda: _auto_axes(stats, xf, m, lay, fast), shards)
    if not _auto_partitioned():
      return _auto_axes(functools.partial(stats, pallas=True), x, m, lay, fast)
  return _auto_axes(stats, xf, m, lay, fast)


def _auto_partitioned() -> bool:
  """Whether the context mesh has an Auto axis of size > 1 (``jax.set_mesh``
  of a mesh with Auto axes, outside a ``shard_map`` over them): the SPMD
  partitioner then places x, and it cannot split the kernel's custom call
  (on TPU the lowering fails, "Mosaic kernels cannot be automatically
  partitioned"; on GPU every device would read all of x), so the XLA path
  runs there. A jit over Auto-sharded inputs with no context mesh cannot
  be told apart at trace time: docs/guides/performance.md."""
  mesh = jax.sharding.get_abstract_mesh()
  auto = jax.sharding.AxisType.Auto
  return any(
    t == auto and mesh.shape[a] > 1
    for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
  )


def _counted(p: local.Partial):
  return (p.count, *local.finalize_lo(p))


def _local_stats_impl(xf, m, lay: Layout, fast: bool, pallas: bool = False):
  if pallas:  # BNJAX_STATS_KERNEL=pallas: xf is x, in its own dtype
    x, xf = xf, xf.astype(local.stats_dtype(xf.dtype))
    return on_platform(
      lambda: local.flax_moments(xf, lay, m, fast),
      lambda: kernel.moments(x, lay, m),
    )
  return on_platform(
    lambda: local.flax_moments(xf, lay, m, fast),
    lambda: _counted(local.exact_partial(xf, lay, m)),
  )


# Under a trace the statistics are jitted functions of (shape, layout),
# traced once per signature and called by every layer that has it: a
# model's BN layers share a handful of shapes, and the conditionals inside
# are costly to trace and to partially evaluate under autodiff (XLA inlines
# the calls). Eagerly they run op by op, as flax's do, for flax's numbers.
_local_stats = jax.jit(
  _local_stats_impl, static_argnames=('lay', 'fast', 'pallas')
)


def _exact_partial_impl(x, lay: Layout, m, pallas: bool = False):
  # x in its own dtype with pallas (the kernel reads it so), else already
  # in the statistics' dtype (the cast is then a no-op). On the CPU the two
  # sums subtract the shift inside their own reductions (split): XLA:CPU
  # would otherwise write d = x - shift out in full.
  xf = x.astype(local.stats_dtype(x.dtype))
  accelerator = (
    (lambda: kernel.layer_partial(x, lay, m))
    if pallas
    else (lambda: local.exact_partial(xf, lay, m))
  )
  return on_platform(
    lambda: local.exact_partial(xf, lay, m, split=True), accelerator
  )


_exact_partial = jax.jit(_exact_partial_impl, static_argnames=('lay', 'pallas'))


def _auto_axes(stats, xf, m, lay: Layout, fast: bool):
  """``stats(xf, m, lay, fast)``, with Explicit mesh axes made Auto inside.

  On a mesh with Explicit axes (``jax.make_mesh``'s default since JAX 0.9)
  the type of a sharded batch carries its sharding, and JAX refuses the
  exact path's blocked reshapes and its one-element slice of a sharded
  axis. Inside ``auto_axes`` the partitioner places them (the reductions
  over the batch become one all-reduce each, as under Auto axes); the
  statistics leave sharded as the input's feature axes.
  """
  spec = getattr(getattr(jax.typeof(xf), 'sharding', None), 'spec', None)
  if not spec or all(s is None for s in spec):
    return stats(xf, m, lay, fast)
  from jax.sharding import PartitionSpec

  feat = PartitionSpec(*(spec[a] for a in lay.feature_axes))
  count = PartitionSpec() if m is None else feat
  # The mesh comes from x's type: a sharded jit needs no context mesh
  # (jax.set_mesh) around it, as flax's BatchNorm needs none. Eagerly, x's
  # concrete mesh, since the call compiles for real devices.
  mesh = getattr(getattr(xf, 'sharding', None), 'mesh', None)
  context: Any = (
    jax.set_mesh(mesh)
    if isinstance(mesh, jax.sharding.Mesh)
    else jax.sharding.use_abstract_mesh(jax.typeof(xf).sharding.mesh)
  )
  # Only the Explicit axes: inside a shard_map over some of the mesh's axes
  # (partial-manual), its Manual axes stay Manual for the sync's collective.
  abstract = jax.typeof(xf).sharding.mesh
  explicit = tuple(
    a
    for a, t in zip(abstract.axis_names, abstract.axis_types, strict=True)
    if t == jax.sharding.AxisType.Explicit
  )
  with context:
    return jax.sharding.auto_axes(
      lambda xf, m: stats(xf, m, lay, fast),
      axes=explicit,
      out_sharding=(count, feat, feat, feat),
    )(xf, m)


def _kernel_over_shards(
  x, m, lay: Layout, sync: Sync
) -> Callable[[], Any] | None:
  """The kernel where x's type shards it over Explicit mesh axes: a jit
  over a sharded batch with no ``axis_name``, or channels over a model axis
  (also inside a ``shard_map`` over the data axis alone, synced over it).

  The kernel is a custom call, which the SPMD partitioner cannot split: left
  to it, every device would gather the whole x (on TPU the export fails).
  Here a ``shard_map`` over x's Explicit axes runs the kernel on each
  device's shard (one read of it); the partials merge over the axes that
  shard the batch with the synced gather (exact, one collective per mesh
  axis), then over ``sync``'s axes as a synced call merges them, and the
  statistics leave sharded as x's feature axes. None (the caller's route)
  for a masked x, which does not take the kernel, and where x's type names
  no mesh axis: unsharded, fully inside a ``shard_map``, or on Auto axes,
  whose sharding is unknown at trace time.
  """
  sharding = getattr(jax.typeof(x), 'sharding', None)
  spec = tuple(getattr(sharding, 'spec', None) or ())
  names = lambda s: () if s is None else (s,) if isinstance(s, str) else s
  manual = {n for s in spec for n in names(s)}
  if m is not None or not manual or sharding is None:
    return None
  spec += (None,) * (x.ndim - len(spec))
  batch = tuple(n for a in lay.reduction_axes for n in names(spec[a]))
  # Inside a shard_map the context mesh has its Manual axes; x's own
  # sharding may still name the mesh as it was outside.
  context = jax.sharding.get_abstract_mesh()
  mesh = context if manual <= set(context.axis_names) else sharding.mesh
  shape = tuple(
    d // math.prod(mesh.shape[n] for n in names(spec[a]))
    for a, d in enumerate(x.shape)
  )
  count = math.prod(shape[a] for a in lay.reduction_axes)
  shard_lay = dataclasses.replace(
    lay,
    count=count,
    shape=shape,
    feature_shape=tuple(shape[a] for a in lay.feature_axes),
  )
  part = jax.sharding.PartitionSpec
  feat = part(*(spec[a] for a in lay.feature_axes))

  def per_shard(x):
    p = _exact_partial(x, shard_lay, None, pallas=True)
    if batch:
      p = gather.gather_merge(p, batch, None, sync.fn)
    if sync.axis_name is not None:
      p = _sync_merge(p, sync)
    count, *stats = _counted(p)
    # The psum carries the count in one buffer with the channels' sums, so
    # it comes back typed as varying over the channels' axes, though it is
    # the same everywhere: a maximum over them makes that explicit.
    vary = sorted(
      (collectives.aval_varying_axes(jax.typeof(count)) or set()) & manual
    )
    if vary:
      count = lax.pmax(count, tuple(vary))
    return (count, *stats)

  return lambda: jax.shard_map(
    per_shard,
    mesh=mesh,
    in_specs=(part(*spec),),
    out_specs=(part(), feat, feat, feat),
    axis_names=manual,
  )(x)


def _traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _synced(xf, m, lay, fast, *, sync: Sync, pallas: bool = False):
  # Exact partials on every platform: synced statistics are not flax's
  # anyway (flax averages per-shard means), so exactness wins here (fast
  # does not apply). Both merges are branch-free. With pallas
  # (BNJAX_STATS_KERNEL=pallas) xf is x in its own dtype, and the GPU/TPU
  # path takes each shard's partial by the kernel (one read of x).
  del fast
  partial = _exact_partial if _traced(xf) else _exact_partial_impl
  return _counted(_sync_merge(partial(xf, lay, m, pallas=pallas), sync))


def _sync_merge(p: local.Partial, sync: Sync) -> local.Partial:
  """The shards' partials merged over ``sync``'s axes, by its mode."""
  merge = psum.psum_merge if sync.mode == 'psum' else gather.gather_merge
  return merge(p, sync.axis_name, sync.groups, sync.fn)


def _complex_moments(x, lay: Layout, mask, fast, sync: Sync):
  """A complex channel as two real ones: its mean is mean(Re) + i mean(Im)
  and its variance E|x - mean|^2 = var(Re) + var(Im) (flax's definition),
  so complex input gets the same exact, synced statistics as real input."""
  xr = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  rlay = Layout(
    lay.ndim + 1,
    lay.feature_axes + (lay.ndim,),
    lay.reduction_axes,
    lay.feature_shape + (2,),
    lay.count,
    tuple(xr.shape),
  )
  m = None if mask is None else jnp.broadcast_to(mask, x.shape)[..., None]
  count, mean, var, lo = batch_moments(xr, rlay, m, fast=fast, sync=sync)
  count = count[..., 0] if count.ndim else count
  mean, lo = (lax.complex(v[..., 0], v[..., 1]) for v in (mean, lo))
  return count, mean, jnp.sum(var, -1), lo


# The backward's collectives and the sharding cast, re-exported here so that
# callers outside the engine import one module.
psum_stacked = collectives.psum_stacked
as_varying = collectives.as_varying
as_varying_stacked = collectives.as_varying_stacked
