"""The one-read Pallas statistics kernel (bnjax/_moments/kernel.py), run on
the CPU in interpret mode: its per-tile partials and its statistics against
float64 and against the XLA path, its derivatives, where it falls back, and
its export for TPU (and CUDA) with the kernel selected.

Small shapes: interpret mode runs the grid as a loop of XLA ops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export
from jax.test_util import check_grads

import bnjax
from benchmarks import numerics
from bnjax import _checks
from bnjax._moments import dispatch, kernel, local
from tests import _hlo
from tests import reference as ref

BAR = 1e-6
LAYOUTS = ('identical', 'means 0.1% apart', 'sorted', 'outlier first')


# One compile per (shape, layout, tile rows): interpret mode compiles slowly.
_moments = jax.jit(kernel.moments, static_argnames=('lay', 'rows'))


def _lay(x, axis=-1):
  return _checks.layout('t', jnp.asarray(x), axis)


def _xla(x, lay, mask=None):
  xf = jnp.asarray(x).astype(local.stats_dtype(x.dtype))
  p = local.exact_partial(xf, lay, mask)
  return (p.count, *local.finalize_lo(p))


def _f64(x, axis=-1):
  return ref.moments(np.asarray(x, np.float64), axis)[:2]


@pytest.fixture
def selected(monkeypatch):
  """The kernel selected, on the accelerator path (as
  BNJAX_STATS_KERNEL=pallas BNJAX_STATS_PATH=accelerator)."""
  monkeypatch.setattr(kernel, 'SELECTED', True)
  monkeypatch.setattr(dispatch, '_path', 'accelerator')


@pytest.mark.parametrize('ratio', [0.0, 1e6])
def test_tile_partials_match_float64_per_tile_with_a_short_last_tile(ratio):
  rng = np.random.default_rng(0)
  x = (ratio + rng.standard_normal((600, 16))).astype(np.float32)
  x[0] += 1e3  # an outlier first: never the pivot
  p = jax.jit(lambda x: kernel.tile_partials(x, 256))(x)
  p = local.Partial(*(np.asarray(v, np.float64) for v in p))
  np.testing.assert_array_equal(p.count, [256, 256, 88])
  for t, lo in enumerate((0, 256, 512)):
    tile = x[lo : lo + int(p.count[t])].astype(np.float64)
    mean = p.shift[t] + p.s1[t] / p.count[t]
    m2 = ((tile - tile.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(mean, tile.mean(0), rtol=0, atol=1e-6 * 1e3)
    np.testing.assert_allclose(p.m2[t], m2, rtol=BAR)
    # The shift is within 2.6e-4 std of the tile's mean (the module's bound)
    # plus its own float32 rounding.
    half_ulp = np.spacing(np.float32(tile.mean(0))) / 2
    assert np.all(
      np.abs(p.shift[t] - tile.mean(0)) <= 3e-4 * tile.std(0) + half_ulp
    )


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shape', ['2-D', '4-D'])
def test_kernel_variance_within_1e6_of_float64_on_the_numerics_layouts(
  layout, shape
):
  """|mean|/std 0 to 1e6, sorted, an outlier first; 16 tiles of 256 rows.
  The mean agrees with the XLA path's to float32 rounding."""
  for ratio in (0.0, *numerics.RATIOS):
    x, _ = numerics.make_data(ratio, layout, seed=0, shape=shape)
    lay = _lay(x)
    assert kernel.applies(x, lay, None, kernel.TILE_ROWS)
    _, mean, var, lo = _moments(x, lay)
    want_mean, want_var = _f64(x)
    err = np.max(np.abs(var - want_var) / want_var)
    assert err <= BAR, (ratio, err)
    got = np.asarray(mean, np.float64) + np.asarray(lo, np.float64)
    np.testing.assert_allclose(got, want_mean, rtol=1e-7, atol=1e-6)
    xla_mean = _xla(x, lay)[1]
    np.testing.assert_allclose(mean, xla_mean, rtol=2**-23, atol=1e-6)


def test_the_merge_in_two_levels_matches_float64():
  """1024 tiles of 8 rows: the tiles merge in two blocked levels."""
  rng = np.random.default_rng(1)
  x = (1e4 + rng.standard_normal((8192, 8))).astype(np.float32)
  x = np.sort(x, axis=0)
  _, mean, var, _ = _moments(x, _lay(x), rows=8)
  want_mean, want_var = _f64(x)
  np.testing.assert_allclose(var, want_var, rtol=BAR)
  np.testing.assert_allclose(mean, want_mean, rtol=2**-23)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_half_precision_input_is_reduced_in_float32(dtype):
  x, _ = numerics.make_data(1e2, 'sorted', seed=0, shape='4-D')
  x = jnp.asarray(x, dtype)
  n, mean, var, _ = _moments(x, _lay(x))
  assert mean.dtype == var.dtype == jnp.float32
  want_mean, want_var = _f64(np.asarray(x, np.float32))
  np.testing.assert_allclose(var, want_var, rtol=BAR)
  np.testing.assert_allclose(mean, want_mean, rtol=2**-23)


@pytest.mark.parametrize(
  'case',
  [
    'mask',
    'C not a multiple of 8',
    'fewer rows than a tile',
    'features leading',
    'float64',
  ],
)
def test_where_the_kernel_does_not_apply_the_xla_path_runs(case):
  rng = np.random.default_rng(2)
  x, axis, mask = rng.standard_normal((512, 16)) + 1e3, -1, None
  if case == 'mask':
    mask = jnp.asarray(rng.random(x.shape) < 0.5)
  elif case == 'C not a multiple of 8':
    x = x[:, :12]
  elif case == 'fewer rows than a tile':
    x = x[:100]
  elif case == 'features leading':
    x, axis = x.T, 0
  if case != 'float64':
    x = x.astype(np.float32)
  with jax.enable_x64(case == 'float64'):
    x = jnp.asarray(x)
    lay = _lay(x, axis)
    assert not kernel.applies(x, lay, mask, kernel.TILE_ROWS)
    got = _moments(x, lay, mask)
    want = jax.jit(_xla, static_argnums=1)(x, lay, mask)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(g, w)


def _loss(stats):
  def loss(x, w):
    _, mean, var, _ = stats(x)
    return jnp.sum(w[0] * mean) + jnp.sum(w[1] * var)

  return loss


@pytest.mark.parametrize('ratio', [0.0, 1e2])
def test_gradients_match_the_xla_paths_and_float64(ratio):
  """The kernel's custom_jvp against autodiff through the XLA path and the
  float64 formulas d mean = <dx>, d var = 2 <(x - mean) dx>."""
  rng = np.random.default_rng(3)
  x = (ratio + rng.standard_normal((600, 8))).astype(np.float32)
  w = rng.standard_normal((2, 8)).astype(np.float32)
  lay = _lay(x)
  g_kernel = jax.jit(jax.grad(_loss(lambda x: kernel.moments(x, lay))))(x, w)
  g_xla = jax.jit(jax.grad(_loss(lambda x: _xla(x, lay))))(x, w)
  x64 = x.astype(np.float64)
  want = (w[0] + 2 * w[1] * (x64 - x64.mean(0))) / x.shape[0]
  np.testing.assert_allclose(g_kernel, want, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(g_kernel, g_xla, rtol=1e-5, atol=1e-9)
  # Forward mode (the rule's own tangent) and second order.
  xs = x[:264] - np.float32(ratio)  # a full tile and a short one
  lay_s = _lay(xs)
  fn = jax.jit(lambda x: kernel.moments(x, lay_s)[1:3])
  check_grads(fn, (xs,), 2, eps=1e-2)


def test_batch_norm_train_step_with_the_kernel_selected(selected):
  """bnjax.batch_norm and bnjax.moments through the engine's hook: the same
  outputs, new statistics and gradients as the XLA path's, and float64's."""
  x, _ = numerics.make_data(1e2, 'outlier first', seed=0, shape='4-D')
  scale = jnp.linspace(0.5, 1.5, x.shape[-1])
  stats = bnjax.init_batch_stats(x.shape[-1])

  def step():  # a new function each time: jit's cache holds the last trace
    def step(x, scale):
      def loss(x, scale):
        y, new = bnjax.batch_norm(
          x, stats, scale, use_running_average=False, momentum=0.0
        )
        return jnp.sum(jnp.sin(y)), (y, new)

      return jax.grad(loss, (0, 1), has_aux=True)(x, scale)

    return jax.jit(step)

  got = step()(x, scale)
  kernel.SELECTED = False
  want = step()(x, scale)
  assert 'bnjax_tile_moments' not in str(jax.make_jaxpr(step())(x, scale))
  np.testing.assert_allclose(got[1][1].var, _f64(x)[1], rtol=BAR)
  # The two paths' float32 means differ by an ulp of |mean| = 100 std.
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  kernel.SELECTED = True
  assert 'bnjax_tile_moments' in str(jax.make_jaxpr(step())(x, scale))
  got_m = jax.jit(lambda x: bnjax.moments(x))(x)
  np.testing.assert_allclose(got_m[1], _f64(x)[1], rtol=BAR)


def _step(x, scale, stats):
  def loss(x, scale):
    y, new = bnjax.batch_norm(x, stats, scale, use_running_average=False)
    return jnp.sum(y * y), new

  return jax.grad(loss, (0, 1), has_aux=True)(x, scale)


def _export_step(platform, dtype, **kw):
  x = jax.ShapeDtypeStruct((8, 16, 16, 128), dtype)
  scale = jnp.ones(128, jnp.float32)
  stats = bnjax.init_batch_stats(128)
  exp = jax_export.export(
    jax.jit(lambda x, s: _step(x, s, stats)), platforms=(platform,), **kw
  )(x, scale)
  return exp.mlir_module()


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_train_step_with_the_kernel_exports_for_tpu_as_a_mosaic_call(
  monkeypatch, dtype
):
  monkeypatch.setattr(kernel, 'SELECTED', True)
  text = _export_step('tpu', dtype)
  assert len(re.findall(r'custom_call @tpu_custom_call', text)) == 1


TRITON = _hlo.TRITON


def test_train_step_with_the_kernel_exports_for_cuda_through_triton(
  monkeypatch,
):
  """Pallas's Triton lowering, the one that takes this kernel (Mosaic GPU
  refuses its axis-0 sums). jax >= 0.12 lowers Triton only for a GPU it
  can see: here the same tile partials lower as XLA ops."""
  monkeypatch.setattr(kernel, 'SELECTED', True)
  text = _export_step('cuda', jnp.float32, disabled_checks=[TRITON])
  calls = len(re.findall(r'custom_call @__gpu\$xla\.gpu\.triton', text))
  assert calls == (1 if _triton_lowers_here() else 0)


def _triton_lowers_here() -> bool:
  """Whether this JAX lowers a Pallas Triton call for CUDA without a GPU
  (jax 0.10: yes; 0.12: no)."""
  x = jax.ShapeDtypeStruct((256, 128), jnp.float32)
  fn = lambda x: kernel._call(x, rows=256, how='triton')  # noqa: E731
  try:
    jax_export.export(jax.jit(fn), platforms=('cuda',))(x)
  except RuntimeError as e:
    assert 'No supported GPU devices' in str(e)
    return False
  except ValueError as e:  # the export's check, after lowering
    assert 'no compatibility guarantees' in str(e)
  return True


def test_a_program_exported_for_several_platforms_carries_each_ones_call(
  monkeypatch,
):
  """One lowering rule per platform: a Pallas call with TPU parameters in a
  lax.platform_dependent branch failed the CUDA lowering of the same
  module ('cpu' too: only interpret mode lowers there)."""
  monkeypatch.setattr(kernel, 'SELECTED', True)
  monkeypatch.setattr(dispatch, '_path', 'accelerator')
  for platforms in (('cuda', 'rocm', 'tpu'), ('cpu', 'tpu')):
    x = jax.ShapeDtypeStruct((8, 16, 16, 128), jnp.bfloat16)
    stats = bnjax.init_batch_stats(128)
    exp = jax_export.export(
      jax.jit(lambda x, s: _step(x, s, stats)),
      platforms=platforms,
      disabled_checks=[TRITON],
    )(x, jnp.ones(128))
    text = exp.mlir_module()
    assert len(re.findall(r'custom_call @tpu_custom_call', text)) == 1


def test_the_gpu_fallback_gives_the_kernels_tile_partials():
  rng = np.random.default_rng(4)
  x = jnp.asarray(1e3 + rng.standard_normal((600, 16)), jnp.float32)
  got = jax.jit(lambda x: kernel._xla_tiles(x, rows=256))(x)
  want = jax.jit(kernel.tile_partials, static_argnums=1)(x, 256)
  for g, w in zip(got, want[1:], strict=True):
    np.testing.assert_allclose(g[:, 0], w, rtol=1e-6, atol=1e-3)


def test_vmap_over_the_kernel_matches_each_call():
  rng = np.random.default_rng(5)
  xs = jnp.asarray(
    rng.standard_normal((3, 300, 8)) * [[[1.0]], [[10.0]], [[0.1]]]
  )
  xs = xs.astype(jnp.float32) + 50.0
  lay = _lay(xs[0])
  got = jax.jit(jax.vmap(lambda x: kernel.moments(x, lay)[1:3]))(xs)
  for i in range(3):
    want = _moments(xs[i], lay)[1:3]
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g[i], w, rtol=1e-6)


def test_a_bad_kernel_name_is_refused_at_import():
  import subprocess
  import sys

  env = {'BNJAX_STATS_KERNEL': 'triton', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(
    [sys.executable, '-c', 'import bnjax'],
    env={**__import__('os').environ, **env},
    capture_output=True,
    text=True,
  )
  assert proc.returncode != 0
  assert "BNJAX_STATS_KERNEL='triton' must be one of ('', 'pallas')" in (
    proc.stderr
  )


# ----------------------------------------------------------- synced path ---

D = 8


def _synced_step(x, scale, sync='gather', mesh=None, axis_names=None):
  """A train step of synced BN under shard_map (check_vma on) over the 'd'
  axis of ``mesh`` (D CPU devices by default; ``axis_names`` makes it a
  shard_map over some of its axes): the outputs, the new statistics and
  the gradients (the scale's summed over 'd')."""
  mesh = mesh or jax.sharding.Mesh(jax.devices()[:D], ('d',))
  spec = jax.sharding.PartitionSpec
  # NumPy state: an array made under jax.set_mesh would carry the mesh
  # outside the shard_map into it.
  c = x.shape[-1]
  stats = bnjax.BatchStats(np.zeros(c, np.float32), np.ones(c, np.float32))

  def per_shard(x, scale):
    def loss(x, scale):
      y, new = bnjax.batch_norm(
        x,
        stats,
        scale,
        use_running_average=False,
        momentum=0.0,
        axis_name='d',
        sync=sync,
      )
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, new)

    (gx, gs), (y, new) = jax.grad(loss, (0, 1), has_aux=True)(x, scale)
    return y, new, gx, jax.lax.psum(gs, 'd')

  kw = {} if axis_names is None else {'axis_names': axis_names}
  return jax.jit(
    jax.shard_map(
      per_shard,
      mesh=mesh,
      in_specs=(spec('d'), spec()),
      out_specs=(spec('d'), spec(), spec('d'), spec()),
      **kw,
    )
  )(x, scale)


@pytest.mark.parametrize('sync', ['gather', 'psum'])
@pytest.mark.parametrize('layout', ['means 0.1% apart', 'outlier shard'])
def test_synced_shards_take_the_kernel_and_match_the_global_batch(
  selected, sync, layout
):
  """Each shard's partial by the kernel (one read), merged across shards:
  the global batch's float64 statistics within the bound, and the same
  outputs and gradients as the XLA path's partials. 'outlier shard': one
  shard 3000 std from the rest, at |mean|/std 1e4."""
  rng = np.random.default_rng(1)
  x = 1e4 + rng.standard_normal((D * 2, 16, 16, 128))
  if layout == 'outlier shard':
    x[:2] += 3000.0
  else:
    x *= 1 + 1e-3 * rng.standard_normal(128)
  x = jnp.asarray(x, jnp.float32)
  scale = jnp.linspace(0.5, 1.5, 128)
  jaxpr = str(jax.make_jaxpr(lambda x, s: _synced_step(x, s, sync))(x, scale))
  assert 'bnjax_tile_moments' in jaxpr
  got = _synced_step(x, scale, sync)
  want_mean, want_var = _f64(np.asarray(x).reshape(-1, 128))
  np.testing.assert_allclose(got[1].var, want_var, rtol=BAR)
  np.testing.assert_allclose(got[1].mean, want_mean, rtol=1e-7)
  kernel.SELECTED = False
  want = _synced_step(x, scale, sync)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


def test_synced_kernel_takes_bfloat16_in_its_own_dtype(selected):
  rng = np.random.default_rng(2)
  x = jnp.asarray(100 + rng.standard_normal((D * 2, 16, 16, 128)), jnp.bfloat16)
  got = _synced_step(x, jnp.ones(128))
  want = _f64(np.asarray(x.astype(jnp.float32)).reshape(-1, 128))
  np.testing.assert_allclose(got[1].var, want[1], rtol=BAR)


def test_synced_kernel_partial_has_the_xla_partials_derivatives():
  """Forward and reverse mode through the kernel's partial (its custom_jvp)
  against local.exact_partial's own derivatives, and second order."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(5 + rng.standard_normal((512, 128)), jnp.float32)
  t = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  lay = _lay(x)

  def stats(partial):
    def mean_var(x):
      p = partial(x)
      return p.shift + p.s1 / p.count, p.m2 / p.count

    return mean_var

  by_kernel = stats(lambda x: kernel.layer_partial(x, lay))
  by_xla = stats(lambda x: local.exact_partial(x, lay))
  fwd = [jax.jvp(f, (x,), (t,))[1] for f in (by_kernel, by_xla)]
  rev = [jax.vjp(f, x)[1]((t[0], t[1])) for f in (by_kernel, by_xla)]
  for got, want in (fwd, rev):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  check_grads(
    lambda x: by_kernel(x)[1],
    (x,),
    order=2,
    modes=('fwd', 'rev'),
    atol=5e-2,
    rtol=5e-2,
  )


def test_synced_train_step_with_the_kernel_exports_for_tpu_per_shard(
  monkeypatch,
):
  """Under shard_map every shard's partial is one Mosaic call, merged by
  the all-gather; no data-dependent conditional."""
  monkeypatch.setattr(kernel, 'SELECTED', True)
  x = jax.ShapeDtypeStruct((D * 2, 16, 16, 128), jnp.bfloat16)
  scale = jax.ShapeDtypeStruct((128,), jnp.float32)
  text = _hlo.export(_synced_step, x, scale, platforms=('tpu',))
  assert len(re.findall(r'custom_call @tpu_custom_call', text)) == 1
  assert 'all_gather' in text
  assert _hlo.conditionals(text)['data'] == 0


# ------------------------------------------------ sharded jit, no name ---


def _sharded_step(x, scale):
  """A train step of unsynced BN, to jit over x sharded on an Explicit
  ('d', 'm') mesh (x's type carries the sharding): the outputs, the new
  statistics and the gradients of x and the scale."""
  stats = bnjax.init_batch_stats(x.shape[-1])

  def loss(x, scale):
    y, new = bnjax.batch_norm(
      x, stats, scale, use_running_average=False, momentum=0.0
    )
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, new)

  return jax.grad(loss, (0, 1), has_aux=True)(x, scale)


def _explicit_mesh():
  return jax.make_mesh(
    (4, 2), ('d', 'm'), axis_types=(jax.sharding.AxisType.Explicit,) * 2
  )


@pytest.mark.parametrize(
  'spec', [('d', 'm'), ('d', None, None, 'm')], ids=['batch', 'batch+channels']
)
def test_sharded_jit_takes_the_kernel_per_shard(selected, spec):
  """Regression: under a jit over a batch sharded on Explicit axes (no
  axis_name), the kernel ran on the whole x (the SPMD partitioner cannot
  split a custom call: on TPU the export failed, "Mosaic kernels cannot be
  automatically partitioned"). A shard_map now runs it on each shard and
  the synced gather merges the partials: the float64 global batch within
  the bound, the XLA path's outputs and gradients, and statistics sharded
  as the channels."""
  rng = np.random.default_rng(4)
  x = 1e4 + rng.standard_normal((D * 4, 8, 8, 128))  # 256 rows a shard
  x[:8] += 3000.0  # an outlier shard
  x = jnp.asarray(x, jnp.float32)
  scale = jnp.linspace(0.5, 1.5, 128)
  mesh = _explicit_mesh()
  P = jax.sharding.PartitionSpec
  named = jax.sharding.NamedSharding
  xs = jax.device_put(x, named(mesh, P(*spec)))
  feat = P(spec[3] if len(spec) > 3 else None)
  ss = jax.device_put(scale, named(mesh, feat))
  step = jax.jit(_sharded_step)
  assert 'bnjax_tile_moments' in str(jax.make_jaxpr(step)(xs, ss))
  (gx, gs), (y, new) = step(xs, ss)
  want_mean, want_var = _f64(np.asarray(x).reshape(-1, 128))
  np.testing.assert_allclose(new.var, want_var, rtol=BAR)
  np.testing.assert_allclose(new.mean, want_mean, rtol=1e-7)
  assert new.mean.sharding.spec == feat, new.mean.sharding
  kernel.SELECTED = False
  # A new function: jit's trace cache keys on it, and SELECTED is read
  # when tracing.
  want = jax.jit(lambda x, s: _sharded_step(x, s))(xs, ss)
  got = ((gx, gs), (y, new))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


def _exported_sharded_step(mesh) -> str:
  """:func:`_sharded_step` exported for TPU (StableHLO text), over a
  bfloat16 batch of 4 x 8 x 8 rows of 128 channels a device, sharded over
  ``mesh``'s ('d', 'm')."""
  P = jax.sharding.PartitionSpec
  x = jax.ShapeDtypeStruct(
    (D * 4, 8, 8, 128),
    jnp.bfloat16,
    sharding=jax.sharding.NamedSharding(mesh, P(('d', 'm'))),
  )
  scale = jax.ShapeDtypeStruct((128,), jnp.float32)
  return _hlo.export(
    _sharded_step,
    x,
    scale,
    platforms=('tpu',),
  )


def test_sharded_jit_with_the_kernel_exports_for_tpu_per_shard(monkeypatch):
  """The Mosaic call reads one device's shard (4 x 8 x 8 rows of 128
  channels), and the partials travel in one all-gather of 3C floats per
  mesh axis of the batch; no data-dependent conditional."""
  monkeypatch.setattr(kernel, 'SELECTED', True)
  text = _exported_sharded_step(_explicit_mesh())
  calls = [
    line for line in text.splitlines() if 'custom_call @tpu_custom_call' in line
  ]
  assert len(calls) == 1 and 'tensor<256x128xbf16>' in calls[0], calls
  gathers = re.findall(r'all_gather.*-> tensor<(\d+)x(\d+)xf32>', text)
  assert sorted(gathers) == [('2', '384'), ('4', '384')], gathers
  assert _hlo.conditionals(text)['data'] == 0


def test_an_auto_mesh_in_context_takes_the_xla_path(monkeypatch):
  """Regression: under ``jax.set_mesh`` of a mesh with Auto axes the SPMD
  partitioner places x, and the kernel's custom call was left to it: the
  TPU export failed ("Mosaic kernels cannot be automatically
  partitioned"). The XLA path runs there: no Mosaic call, no data
  conditional. Inside a ``shard_map`` over that mesh's axes (Manual there:
  each body sees its own shard) the kernel still runs."""
  monkeypatch.setattr(kernel, 'SELECTED', True)
  mesh = jax.make_mesh(
    (4, 2), ('d', 'm'), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  mosaic = 'custom_call @tpu_custom_call'
  with jax.set_mesh(mesh):
    text = _exported_sharded_step(mesh)
    assert mosaic not in text
    assert _hlo.conditionals(text)['data'] == 0
    text = _hlo.export(
      lambda x, s: _synced_step(x, s, 'gather', mesh),
      jax.ShapeDtypeStruct((D * 2, 8, 8, 128), jnp.float32),
      jax.ShapeDtypeStruct((128,), jnp.float32),
      platforms=('tpu',),
    )
    assert text.count(mosaic) == 1, text.count(mosaic)


def _data_only_step(x, scale, sync='gather'):
  """:func:`_synced_step` in a shard_map over 'd' alone on the Explicit
  ('d', 'm') mesh, the channels over 'm'. Called under ``jax.set_mesh`` of
  that mesh."""
  return _synced_step(x, scale, sync, _explicit_mesh(), axis_names={'d'})


@pytest.mark.parametrize('sync', ['gather', 'psum'])
def test_shard_map_over_data_with_channels_over_model_takes_the_kernel(
  selected, sync
):
  """Regression: synced over 'data' in a shard_map over 'data' alone, the
  channels over an Explicit 'm' axis, the kernel was left to the
  partitioner inside auto_axes (the TPU export failed as above). It now
  runs on each device's shard: the float64 global batch within the bound,
  the XLA path's outputs and gradients."""
  rng = np.random.default_rng(5)
  x = 1e4 + rng.standard_normal((D * 2, 8, 8, 128))
  x[:2] += 3000.0
  x = jnp.asarray(x, jnp.float32)
  mesh = _explicit_mesh()
  P = jax.sharding.PartitionSpec
  xs = jax.device_put(
    x, jax.sharding.NamedSharding(mesh, P('d', None, None, 'm'))
  )
  scale = jax.device_put(
    jnp.linspace(0.5, 1.5, 128), jax.sharding.NamedSharding(mesh, P('m'))
  )
  with jax.set_mesh(mesh):
    jaxpr = str(
      jax.make_jaxpr(lambda x, s: _data_only_step(x, s, sync))(xs, scale)
    )
    got = _data_only_step(xs, scale, sync)
  assert 'bnjax_tile_moments' in jaxpr
  want_mean, want_var = _f64(np.asarray(x).reshape(-1, 128))
  np.testing.assert_allclose(got[1].var, want_var, rtol=BAR)
  np.testing.assert_allclose(got[1].mean, want_mean, rtol=1e-7)
  kernel.SELECTED = False
  with jax.set_mesh(mesh):
    want = _data_only_step(xs, scale, sync)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


@pytest.mark.xfail(
  jax.__version_info__ < (0, 9),
  reason='JAX 0.8 lowers the Mosaic call of a shard_map nested in a '
  'partial-manual one for the partitioner (docs/guides/performance.md)',
  raises=NotImplementedError,
  strict=True,
)
def test_shard_map_over_data_with_the_kernel_exports_for_tpu_per_shard(
  monkeypatch,
):
  monkeypatch.setattr(kernel, 'SELECTED', True)
  mesh = _explicit_mesh()
  P = jax.sharding.PartitionSpec
  x = jax.ShapeDtypeStruct(
    (D * 2, 8, 8, 256),
    jnp.float32,
    sharding=jax.sharding.NamedSharding(mesh, P('d', None, None, 'm')),
  )
  scale = jax.ShapeDtypeStruct((256,), jnp.float32)
  with jax.set_mesh(mesh):
    text = _hlo.export(
      lambda x, s: _data_only_step(x, s), x, scale, platforms=('tpu',)
    )
  calls = [
    line for line in text.splitlines() if 'custom_call @tpu_custom_call' in line
  ]
  # 16 / 4 x 8 x 8 rows, 256 / 2 channels: one device's shard
  assert len(calls) == 1 and 'tensor<256x128xf32>' in calls[0], calls
  assert _hlo.conditionals(text)['data'] == 0
