"""Deliberate differences from Flax's own BatchNorm tests, in one place.

Every ported case passes except those listed here, each skipped with its
reason. README.md ("Differences from Flax") lists the same entries;
tests/docs/test_readme.py checks that the two lists agree.
"""

import pathlib
import re

import flax
import pytest

# Ports of flax's own tests (tests/peer/port_flax.py), one per flax release
# whose BatchNorm tests changed. The installed flax runs the newest port not
# newer than itself: flax 0.12.12's tests use APIs 0.12.8 lacks, and 0.12.8's
# hijax test fails on flax 0.12.12 with flax's own BatchNorm too.
_HERE = pathlib.Path(__file__).parent


def _version(text):
  return tuple(int(p) for p in re.findall(r'\d+', text)[:3])


PORTS = sorted(
  (p for p in _HERE.glob('flax_*') if p.is_dir()),
  key=lambda p: _version(p.name),
)
_INSTALLED = _version(flax.__version__)
_USABLE = [p for p in PORTS if _version(p.name) <= _INSTALLED]
RUNNING = _USABLE[-1] if _USABLE else None
collect_ignore = [str(p) for p in PORTS if p is not RUNNING]

# test id pattern -> (title, reason). Keep this short: each entry is a
# behaviour a Flax user meets, and must be defensible to one. The README's
# "Differences from Flax and PyTorch" list has one bullet per title.
DIFFERENCES = {
  # The mask cases (odd parameterizations) of nnx/linen equivalence: the
  # mask [T, F, T, F, T] empties channels 1 and 3.
  r'test_flax_nnx_nn_normalization\.py::TestLinenConsistency::'
  r'test_nnx_linen_batchnorm_equivalence(1|3|5|7|9|11|13|15)$': (
    'Empty masked channel',
    'flax outputs NaN in a channel with no masked-in value and stores NaN '
    'running statistics for good; bnjax normalizes that channel with the '
    'running statistics (what inference gives) and leaves them unchanged. '
    'The other channels match flax (tests/modules/test_flax_dropin.py)',
  ),
  # equinox 0.13.8's own tests (tests/peer/equinox_0_13_8, hand-ported).
  r'test_equinox_nn\.py::test_batch_norm\[ema\]$': (
    'Equinox mode="ema" refused',
    'equinox\'s mode="ema" normalizes training batches by a running average '
    '(gradient spikes, equinox#659); bnjax.equinox.BatchNorm always '
    'normalizes by the batch statistics and raises for mode="ema", naming '
    'mode="batch" and debias=True',
  ),
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    nodeid = item.nodeid.split('tests/peer/')[-1]
    for pattern, (title, reason) in DIFFERENCES.items():
      if re.search(pattern, nodeid):
        item.add_marker(
          pytest.mark.skip(reason=f'deliberate: {title}: {reason}')
        )
