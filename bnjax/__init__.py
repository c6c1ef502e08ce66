"""bnjax: batch normalization for JAX as pure functions."""

from bnjax._act import ELU, Identity, LeakyReLU
from bnjax._core import batch_norm, moments, normalize
from bnjax._fold import fold
from bnjax._pooled import apply_pooled
from bnjax._running import population_stats
from bnjax._types import (
  BatchStats,
  CumulativeStats,
  DebiasedStats,
  PooledStats,
  RenormStats,
  init_batch_stats,
  init_cumulative_stats,
  init_debiased_stats,
  init_pooled_stats,
  init_renorm_stats,
)
from bnjax._variants import batch_norm_act, batch_renorm, frozen_batch_norm

__version__ = '0.2.0'

__all__ = [
  'ELU',
  'BatchStats',
  'Identity',
  'LeakyReLU',
  'CumulativeStats',
  'DebiasedStats',
  'PooledStats',
  'RenormStats',
  'apply_pooled',
  'batch_norm',
  'batch_norm_act',
  'batch_renorm',
  'fold',
  'frozen_batch_norm',
  'init_batch_stats',
  'init_cumulative_stats',
  'init_debiased_stats',
  'init_pooled_stats',
  'init_renorm_stats',
  'moments',
  'normalize',
  'population_stats',
]
