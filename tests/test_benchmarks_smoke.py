"""Keeps the benchmark scripts working: a seconds-long smoke run of each."""

from benchmarks import layer


def test_layer_benchmark_smoke():
  rows = layer.main(['--smoke'])
  assert {r['mode'] for r in rows} == {'fwd', 'grad', 'step'}
  step = [r for r in rows if r['mode'] == 'step'][0]
  assert step['bnjax_residuals'] == 1 < step['flax_residuals']
