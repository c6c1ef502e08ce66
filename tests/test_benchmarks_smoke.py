"""Keeps the benchmark scripts working: a seconds-long smoke run of each."""

from benchmarks import layer


def test_layer_benchmark_smoke():
  rows = layer.main(['--smoke'])
  assert {r['mode'] for r in rows} == {'fwd', 'grad', 'step'}
  step = [r for r in rows if r['mode'] == 'step'][0]
  assert step['bnjax_residuals'] == 1 < step['flax_residuals']


def test_sync_benchmark_smoke():
  from benchmarks import sync
  rows = sync.main(['--smoke'])
  assert rows and all(r['step_sync_ms'] > 0 for r in rows)


def test_sync_model_matches_the_hlo():
  from benchmarks import sync_model
  out = sync_model.main(['--smoke'])
  assert out['hlo_check']['agrees'], out['hlo_check']


def test_model_benchmark_smoke():
  from benchmarks import model
  row = model.main(['--smoke'])
  assert row['bnjax_ms'] > 0 and row['bnjax_mem']['peak_mb'] > 0


def test_torch_layer_benchmark_smoke():
  import pytest
  pytest.importorskip('torch')
  from benchmarks import torch_layer
  rows = torch_layer.main(['--smoke'])
  assert all(r['best_ms'] > 0 for r in rows)
