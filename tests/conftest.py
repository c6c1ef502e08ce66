"""Test configuration: 8 host CPU devices for the sync tests, set before JAX starts."""

import os

import jax

jax.config.update('jax_num_cpu_devices', 8)

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
