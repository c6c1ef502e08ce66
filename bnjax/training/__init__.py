r"""BN inside training loops: accumulation, freezing, syncing, recalibration.

Model-level tools over the functional core, for the four things a training
loop needs from its BN layers, one file each:

* **Gradient accumulation** (``_pooling.py``). k micro-batches should
  update the running statistics once, as one batch of all k would, not k
  times on small batches. Every entry pools exact moments by count (a
  :class:`bnjax.PooledStats`) and applies them with one call of one shape,
  ``apply_pooled(batch_stats, pooled, *, when) -> (batch_stats, pooled)``:
  functional, :func:`bnjax.apply_pooled`; linen (the ``batch_moments``
  collection), :func:`bnjax.linen.apply_pooled`; nnx, in place,
  :func:`start_pooling`, :func:`apply_pooled`, :func:`stop_pooling`.
* **Freezing BN** (``_modes.py``) across a model or a sub-model
  (fine-tuning, detection backbones): :func:`set_mode` for nnx,
  :func:`mode_fields` for linen, and :func:`bn_param_mask` for an optax mask
  over BN's scale and bias.
* **Syncing per-device statistics** (``_averaging.py``) of local-BN
  data-parallel training before evaluation or a checkpoint:
  :func:`average_stats`.
* **Recalibration** (``_recalibration.py``) after weight averaging (SWA, an
  EMA of parameters), pruning or a change of data (AdaBN): precise BN,
  :func:`recalibrate`, one entry for functions, linen and nnx models.

See the guide "BN in training loops".
"""

from bnjax.training._averaging import average_stats
from bnjax.training._modes import bn_param_mask, mode_fields, set_mode
from bnjax.training._pooling import apply_pooled, start_pooling, stop_pooling
from bnjax.training._recalibration import recalibrate

__all__ = [
  'apply_pooled',
  'average_stats',
  'bn_param_mask',
  'mode_fields',
  'recalibrate',
  'set_mode',
  'start_pooling',
  'stop_pooling',
]
