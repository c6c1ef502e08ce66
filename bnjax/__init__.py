"""bnjax: batch normalization for JAX as pure functions."""

from bnjax._core import batch_norm
from bnjax._core import frozen_batch_norm
from bnjax._core import moments
from bnjax._core import normalize
from bnjax._renorm import batch_renorm
from bnjax._running import population_stats
from bnjax._types import BatchStats
from bnjax._types import CumulativeStats
from bnjax._types import DebiasedStats
from bnjax._types import RenormStats
from bnjax._types import init_batch_stats
from bnjax._types import init_cumulative_stats
from bnjax._types import init_debiased_stats
from bnjax._types import init_renorm_stats

__version__ = '0.1.0'

__all__ = [
    'BatchStats',
    'CumulativeStats',
    'DebiasedStats',
    'RenormStats',
    'batch_norm',
    'batch_renorm',
    'frozen_batch_norm',
    'init_batch_stats',
    'init_cumulative_stats',
    'init_debiased_stats',
    'init_renorm_stats',
    'moments',
    'normalize',
    'population_stats',
]
