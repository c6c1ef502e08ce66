"""Test configuration: 8 host CPU devices for the sync tests, set before JAX starts."""

import gc
import os

import jax
import pytest

DEVICES = 8
jax.config.update('jax_num_cpu_devices', DEVICES)
# XLA:CPU runs a program's per-device parts on a pool of max(cores, devices)
# threads. With 8 devices on 2 busy cores (xdist's two workers), jax 0.8.1
# and 0.10.2 now and then deadlock in an all-reduce: some participants never
# get a thread, the rest wait 40 s, then XLA aborts the process (CI's README
# job lost a worker so, in test_sharded_jit_eagerly). Measured with eager
# sums on an 8-way sharded array beside two busy processes (jax 0.10.2): a
# pool of 8 threads hung within 500 steps (4 runs of 4), of 9, 10 or 12
# within 2000; one of 16 ran 3000 steps (2 runs), and 6000 beside four busy
# processes; jax 0.12 did not hang. XLA sizes the pool from PJRT_NPROC when
# set; the subprocesses tests start (experiments, guides, benchmarks)
# inherit it.
os.environ.setdefault('PJRT_NPROC', str(2 * DEVICES))

from hypothesis import settings  # noqa: E402

# Profiles (BNJAX_HYPOTHESIS=NAME): 'ci', the default, 100 examples per
# property, derandomized so a run is reproducible (each example is a new
# shape, so a new compile: the properties' cost is their example count);
# 'dev', 30, the quick inner loop and the newest and floor jobs; 'nightly',
# 2000 fresh random examples, for a long run hunting new cases.
settings.register_profile(
  'ci', max_examples=100, deadline=None, derandomize=True, print_blob=True
)
settings.register_profile('dev', max_examples=30, deadline=None)
settings.register_profile(
  'nightly', max_examples=2000, deadline=None, print_blob=True
)
settings.load_profile(os.environ.get('BNJAX_HYPOTHESIS', 'ci'))


def pytest_collection_modifyitems(config, items):
  """Tests marked ``heavy`` (tens of CPU-seconds each; ``heavy(seconds)``
  for the heaviest) run first, heaviest first: with the suite spread over
  the cores (pytest-xdist's ``-n``), a heavy test left for last would run
  alone while the other workers sit idle."""

  def weight(item):
    mark = item.get_closest_marker('heavy')
    return 0 if mark is None else (mark.args[0] if mark.args else 10)

  items.sort(key=weight, reverse=True)  # stable: otherwise in file order


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """Each test module's compiled programs are dropped after it. The suite
  compiles thousands of programs (each hypothesis example is a new shape)
  and a worker kept them all: one held 4.1 GB after 18% of the suite and
  grew on, and CI's README job lost a worker near its end on the 24 GB
  machine. Dropped per module, a 207-test subset (oracle, exactness, grad,
  data-parallel) peaks at 1.05 GB instead of 1.98 GB.
  ``BNJAX_KEEP_CACHES=1`` keeps them (to measure this)."""
  yield
  if os.environ.get('BNJAX_KEEP_CACHES'):
    return
  jax.clear_caches()
  gc.collect()
