"""bnjax: batch normalization for JAX as pure functions."""

from bnjax._core import batch_norm
from bnjax._core import moments
from bnjax._core import normalize
from bnjax._types import BatchStats
from bnjax._types import init_batch_stats

__version__ = '0.1.0'

__all__ = [
    'BatchStats',
    'batch_norm',
    'init_batch_stats',
    'moments',
    'normalize',
]
