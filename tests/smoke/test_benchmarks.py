"""Keeps the benchmark scripts working: a seconds-long smoke run of each."""

import pytest

from benchmarks import layer


def test_layer_benchmark_smoke():
  rows = layer.main(['--smoke'])
  assert {r['mode'] for r in rows} == {'fwd', 'grad', 'step'}
  step = [r for r in rows if r['mode'] == 'step'][0]
  assert step['bnjax_residuals'] == 1 < step['flax_residuals']


def test_reductions_benchmark_smoke():
  """Every single-read form computes the same two sums (checked inside)."""
  from benchmarks import reductions

  out = reductions.main(['--smoke'])
  assert {r['form'] for r in out['rows']} >= {'two_sums', 'variadic_reduce'}
  c = out['compile_s']
  assert c['layers'] == 2
  assert all(
    c[k] > 0 for k in ('plain', 'cond_pass', 'cond_kernel', 'cond_exact')
  )


def test_sync_benchmark_smoke():
  """Each row: both synced paths give the global batch's output and
  statistics (float32 round-off), the bytes each path sends as its
  docstring states them (all-gather of 3DC floats; psums of C, C + 1 and
  2C; 2C backward), and the overheads the table prints are the ratios of the
  step times it prints. It only checked step_sync_ms > 0 before."""
  from benchmarks import sync

  rows = sync.main(['--smoke'])
  assert rows
  for r in rows:
    c, d = r['channels'], r['devices']
    assert c == r['shape'][-1] and d == 8, r
    assert set(r['vs_global']) == {'gather', 'psum'}, r
    assert max(r['vs_global'].values()) < 1e-5, r['vs_global']
    assert r['gather_forward_bytes'] == d * 3 * c * 4
    assert r['psum_forward_bytes'] == (4 * c + 1) * 4
    assert r['backward_bytes'] == 2 * c * 4
    ms = r['step_sync_ms'], r['step_psum_ms'], r['step_local_ms']
    assert r['sync_overhead'] == pytest.approx(ms[0] / ms[2], rel=1e-9)
    assert r['psum_overhead'] == pytest.approx(ms[1] / ms[2], rel=1e-9)
    timed = [k for k in r if k.endswith(('_ms', '_us'))]
    assert len(timed) == 7 and all(r[k] > 0 for k in timed), r
  # The README table renders a smoke run's rows (the columns it reads exist).
  assert sync.sync_table(
    dict(env=dict(machine='m', jax='j', date='d', commit='c'), rows=rows)
  ).count('\n') == 3 + len(rows)


def test_sync_model_matches_the_hlo():
  from benchmarks import sync_model

  out = sync_model.main(['--smoke'])
  assert out['hlo_check']['agrees'], out['hlo_check']


@pytest.mark.heavy
def test_model_benchmark_smoke():
  from benchmarks import model

  row = model.main(['--smoke'])
  assert row['bnjax_ms'] > 0 and row['bnjax_mem']['peak_mb'] > 0
  # The profiler breakdown found both kinds of op in both models.
  for impl in ('flax', 'bnjax'):
    ms = row[f'{impl}_profile']['op_ms']
    assert ms['conv'] > 0 and ms['bn'] > 0, (impl, ms)
  q25, q75 = row['step_ratio_q25'], row['step_ratio_q75']
  assert 0 < q25 <= q75


def test_profile_labels_instructions_by_what_they_fuse():
  from benchmarks import _profile

  hlo = """
%fused_conv (p: f32[4]) -> f32[4] {
  %c = f32[4] convolution(%p, %p), window={}
}
%fused_bn (p: f32[4]) -> f32[4] {
  %m = f32[4] multiply(%p, %p), metadata={op_name="jit(f)/BatchNorm_0/mul"}
}
ENTRY %main (x: f32[4]) -> f32[4] {
  %a = f32[4] fusion(%x), kind=kCustom, calls=%fused_conv
  %b = f32[4] fusion(%a), kind=kLoop, calls=%fused_bn
  ROOT %r = f32[4] add(%a, %b)
}
"""
  kinds = _profile.instruction_kinds(hlo)
  assert (kinds['a'], kinds['b'], kinds['r']) == ('conv', 'bn', 'other')


def test_torch_layer_benchmark_smoke():
  from tests._helpers import import_torch

  import_torch()
  from benchmarks import torch_layer

  rows = torch_layer.main(['--smoke'])
  # Every mode, both layouts of a 4-D shape, and the best of them (what
  # layer.py compares bnjax with).
  assert [r['mode'] for r in rows] == list(torch_layer.MODES)
  for r in rows:
    ms = [r['nchw_ms'], r['channels_last_ms']]
    assert min(ms) > 0 and r['best_ms'] == min(ms), r


@pytest.mark.heavy
def test_fold_benchmark_smoke():
  from benchmarks import fold

  (row,) = fold.main(['--smoke'])['rows']
  assert row['bn_ms'] > 0 and row['folded_ms'] > 0
  assert row['max_rel_logit_diff'] < 1e-4


def test_sync_lowering_smoke():
  """At 8 devices: the gather path lowers one all-gather of 3C floats
  forward (an unmasked count is a constant, not sent); the psum path three
  all-reduces, C floats (the shared reference), C + 1 (the count and first
  moments around it) and 2C (the sums around the mean that gives), none
  inside a conditional; both one all-reduce of 2C backward."""
  from benchmarks import sync_lowering

  rows = sync_lowering.main(['--smoke'])
  for r in rows:
    c = r['channels']
    ops = [
      (o['kind'], o['operand_floats'], o['conditional'])
      for o in r['collectives']
    ]
    if r['sync'] == 'gather':
      assert ops == [
        ('all_gather', 3 * c, False),
        ('all_reduce', 2 * c, False),
      ], ops
    else:
      assert ops == [
        ('all_reduce', c, False),
        ('all_reduce', c + 1, False),
        ('all_reduce', 2 * c, False),
        ('all_reduce', 2 * c, False),
      ], ops


def test_the_row_writer_names_and_computes_the_timing_columns():
  """benchmarks/_timing.py writes the timing and compile columns of every
  results row (layer, model, device, inplace_abn, compile, sync_compile):
  each side's median, the ratio of medians, the paired rounds' quartiles."""
  from benchmarks import _timing

  samples = {'flax': [1.0, 2.0, 4.0, 8.0], 'bnjax': [1.0, 3.0, 2.0, 4.0]}
  assert _timing.ratio_columns(samples, prefix='step_') == {
    'flax_ms': 3000.0,
    'bnjax_ms': 2500.0,
    'step_ratio': 2500.0 / 3000.0,
    'step_ratio_q25': 0.5,  # of the paired ratios 1, 1.5, 0.5, 0.5
    'step_ratio_q75': 1.125,
  }
  act = _timing.ratio_columns(
    {'bnjax': [2.0], 'bnjax_act': [1.0]}, num='bnjax_act', den='bnjax'
  )
  assert act == {
    'bnjax_ms': 2000.0,
    'bnjax_act_ms': 1000.0,
    'ratio': 0.5,
    'ratio_q25': 0.5,
    'ratio_q75': 0.5,
  }
  assert _timing.compile_columns({'flax': [2.0, 4.0], 'bnjax': [3.0, 2.0]}) == {
    'flax_s': 3.0,
    'bnjax_s': 2.5,
    'ratio': 2.5 / 3.0,
    'pair_ratios': [0.5, 1.5],
    'flax_all_s': [2.0, 4.0],
    'bnjax_all_s': [3.0, 2.0],
  }


def test_write_result_appends_a_run_and_keeps_the_earlier_ones(
  tmp_path, monkeypatch
):
  from benchmarks import _timing

  monkeypatch.setattr(_timing, 'RESULTS', tmp_path)
  for i in range(3):
    _timing.write_result('x', dict(env=dict(commit=f'c{i}'), value=i))
  assert [r['value'] for r in _timing.runs('x')] == [0, 1, 2]
  assert _timing.latest('x')['env']['commit'] == 'c2'


def test_every_committed_benchmark_run_records_its_commit_and_date():
  import pathlib

  from benchmarks import _timing

  names = [
    p.stem
    for p in (pathlib.Path(_timing.__file__).parent / 'results').glob('*.json')
  ]
  assert 'layer' in names
  for name in names:
    recorded = _timing.runs(name)
    assert recorded, name
    for run in recorded:
      assert run['env']['date'] and run['env']['commit'], (name, run['env'])
      # True, False, or None for runs recovered from before the flag.
      assert run['env'].get('dirty') in (True, False, None), (name, run['env'])


def test_compile_benchmark_smoke():
  from benchmarks import compile as compile_bench

  out = compile_bench.main(['--smoke'])
  (row,) = out['rows']
  # One recorded round each: the medians are those rounds, and the ratio
  # is the one pair's.
  assert row['flax_all_s'] == [row['flax_s']] and row['flax_s'] > 0
  assert row['bnjax_all_s'] == [row['bnjax_s']] and row['bnjax_s'] > 0
  assert row['pair_ratios'] == [row['ratio']]
  assert row['ratio'] == pytest.approx(row['bnjax_s'] / row['flax_s'])


@pytest.mark.heavy
def test_device_benchmark_smoke():
  """The GPU benchmark's code on the CPU at seconds-long sizes: every part
  runs (smoke mode raises on any error) and each path's statistics are
  timed, the dropped one-read variant's too."""
  from benchmarks import device

  out = device.main(['--smoke'])
  assert {r['mode'] for r in out['layer']} == {'fwd', 'step'}
  paths = {r['path'] for r in out['stats']}
  assert {'flax one-pass', 'bnjax two reads'} < paths, paths
  # The Pallas kernel's rows (interpret mode here), float32 and bfloat16.
  assert {'bnjax one read, Pallas kernel', 'flax one-pass, bf16'} < paths
  assert 'bnjax one read, Pallas kernel, bf16' in paths, paths
  assert {r['dtype'] for r in out['layer']} == {'float32', 'bfloat16'}
  assert all(r['kernel_ms'] > 0 for r in out['layer'])
  assert any(p.endswith('adjacent') for p in paths), paths
  assert max(r['err'] for r in out['numerics'] if r['impl'] != 'flax') < 1e-6
  assert out['cond']['conditionals_compiled'] == 4
  assert out['resnet50']['flax']['conditionals'] == 0
  # The ResNet step in float32 and bfloat16, each with the kernel too; the
  # table shows both dtypes and the kernel's rows.
  assert out['resnet50_bf16']['dtype'] == 'bfloat16'
  for r in (out['resnet50'], out['resnet50_bf16']):
    assert r['bnjax_ms'] > 0 and r['kernel_ms'] > 0, r
  table = device.device_table(out)
  assert 'bfloat16 | ' in table and table.count('Pallas kernel |') == 2, table


@pytest.mark.parametrize('strided', [True, False])
@pytest.mark.parametrize('shape', ['2-D', '4-D'])
def test_the_dropped_one_read_variant_is_exact(shape, strided):
  """benchmarks/_tiled.py's docstring: within 1e-6 of float64 (measured
  2.9e-7) at |mean|/std 1e2 to 1e6, on sorted data and an outlier first,
  whichever way its tiles take their values. Its speed is what dropped it
  (results/device_tiled.json), not its numbers."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import _tiled, numerics
  from bnjax import _checks
  from bnjax._moments import local

  for layout in ('identical', 'sorted', 'outlier first'):
    for ratio in (1e2, 1e4, 1e6):
      x, _ = numerics.make_data(ratio, layout, seed=0, shape=shape)
      lay = _checks.layout('t', jnp.asarray(x), -1)
      p = jax.jit(
        lambda v, lay=lay: _tiled.tiled_partial(v, lay, strided=strided)
      )(jnp.asarray(x))
      want = np.float64(x).reshape(-1, x.shape[-1]).var(0)
      err = np.max(np.abs(np.float64(local.finalize(p)[1]) - want) / want)
      assert err <= 1e-6, (layout, ratio, err)


@pytest.mark.heavy(60)
def test_inplace_abn_benchmark_smoke():
  """batch_norm_act keeps fewer activations than bnjax.batch_norm + leaky
  ReLU, which keeps fewer than flax's BN + leaky ReLU, and no more compiled
  memory a layer than conv + leaky ReLU."""
  from benchmarks import inplace_abn

  out = inplace_abn.main(['--smoke'])
  per_layer = {r['kind']: r['per_layer_mb'] for r in out['stack']}
  assert per_layer['batch_norm_act:elu'] <= per_layer['leaky_relu'] * 1.01
  res = {k: v['mem'][-1]['residuals_4d'] for k, v in out['resnet50'].items()}
  assert res['bnjax_act'] < res['bnjax'] < res['flax'], res
  assert out['time']['ratio'] > 0


@pytest.mark.heavy(30)
def test_sync_compile_smoke():
  """Both mappings compile and run for flax and bnjax; bnjax's synced
  program gathers once per BN layer forward (3 in the tiny ResNet) and
  holds no conditional."""
  from benchmarks import sync_compile

  rows = sync_compile.main(['--smoke'])['rows']
  assert [r['mapping'] for r in rows] == ['pmap', 'shard_map']
  for r in rows:
    assert r['collectives']['bnjax']['all-gather'] == 3, r['collectives']
    assert r['collectives']['bnjax']['conditional'] == 0, r['collectives']
    assert r['flax_s'] > 0 and r['bnjax_s'] > 0 and r['step_ratio'] > 0


@pytest.mark.parametrize('name', ['resnet18', 'resnet20', 'resnet50'])
def test_every_model_of_the_zoo_builds(name):
  """Each model the benchmarks time builds with each BN class (shapes only:
  the full-size runs are the only other callers of resnet18 and resnet50,
  and a NameError there once waited for the next benchmark run)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  import bnjax.linen
  from benchmarks import _models

  build = getattr(_models, name)
  for cls in (nn.BatchNorm, bnjax.linen.BatchNorm):
    kw = {'dtype': jnp.bfloat16} if name != 'resnet18' else {}
    model = build(cls, **kw)
    x = jnp.ones((2, 32, 32, 3))
    v = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, False))
    assert v['batch_stats'], name
