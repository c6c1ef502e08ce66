"""bnjax's statistics engine: the ONLY code that calls collectives.

- ``local``: exact per-channel partial moments of one shard (blocked sums
  and a shift near the mean, so the error bound holds for any summation
  order) and the CPU fast path;
- ``combine``: the exact merge of stacked partials (Chan's update, one
  reduction);
- ``gather`` and ``psum``: the two ways statistics combine over mapped axes;
- ``axes``: names, sizes and groups of mapped axes (validation, no
  communication);
- ``collectives``: the collectives themselves;
- ``dispatch``: the platform choice, in one place, and :func:`batch_moments`,
  the entry the rest of bnjax calls.
"""

from bnjax._moments.axes import (
  canonical_groups,
  check_axis_name,
  check_bound,
  names,
  num_shards,
  uniform_shards,
)
from bnjax._moments.combine import merge
from bnjax._moments.dispatch import (
  LOCAL,
  Sync,
  as_varying,
  as_varying_stacked,
  batch_moments,
  forced_path,
  on_platform,
  psum_stacked,
)
from bnjax._moments.local import (
  Partial,
  exact_partial,
  finalize,
  finalize_lo,
  real_dtype,
  stats_dtype,
)
from bnjax._moments.psum import SYNC_MODES, check_mode, resolve

__all__ = [
  'LOCAL',
  'SYNC_MODES',
  'Partial',
  'Sync',
  'as_varying',
  'as_varying_stacked',
  'batch_moments',
  'canonical_groups',
  'check_mode',
  'check_axis_name',
  'check_bound',
  'exact_partial',
  'finalize',
  'finalize_lo',
  'forced_path',
  'merge',
  'names',
  'num_shards',
  'on_platform',
  'psum_stacked',
  'real_dtype',
  'resolve',
  'stats_dtype',
  'uniform_shards',
]
