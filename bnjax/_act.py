r"""BN followed by an invertible activation, keeping only its output.

The activations and the checked :class:`Spec` that the core takes live here,
below ``bnjax._core`` (the modules' ``BatchNormAct`` build theirs here); the
public function is :func:`bnjax.batch_norm_act`.

InPlace-ABN (Rota Bulo, Porzi and Kontschieder, CVPR 2018): training-mode
:math:`y = \phi(\gamma \hat x + \beta)` saves for the backward only y, which
the next layer (a convolution) saves anyway, and per-channel vectors. The
backward inverts the activation and recovers

.. math:: \hat x = (\phi^{-1}(y) - \beta) / \gamma ,
   \qquad \partial L / \partial z = \partial L / \partial y \cdot
   \phi'(\phi^{-1}(y)),

then runs BN's own backward (``bnjax._train``). Each activation below owns
its forward, its inverse and its derivative written in terms of its output.
ReLU has no inverse (its zeros lose x, and BN's backward needs
:math:`\hat x` everywhere), so it is refused.

:math:`\gamma` near 0 makes :math:`\hat x` unrecoverable (every output is
:math:`\approx \beta`). Where :math:`|\gamma|` is below ``scale_floor`` the
layer uses :math:`\gamma' = \pm` ``scale_floor`` (sign of :math:`\gamma`,
its sign bit at 0: ``+0.0`` floors up, ``-0.0`` down), in training and
inference alike; its gradient reaches
:math:`\gamma` unchanged (straight-through), so a floored scale still
learns. InPlace-ABN instead uses :math:`|\gamma| + \epsilon` everywhere,
which changes the sign of negative scales: a pretrained checkpoint would
not load as the same function.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


class Identity(NamedTuple):
  """No activation: :func:`bnjax.batch_norm_act` is BN that saves y.

  Attributes:
    (none): the identity has no parameter.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> bnjax.Identity().inverse(jnp.array([-2.0, 3.0]))
    Array([-2.,  3.], dtype=float32)
  """

  def __call__(self, z: Array) -> Array:
    return z

  def inverse(self, y: Array) -> Array:
    return y

  def slope(self, y: Array) -> Array:
    """The activation's derivative at ``inverse(y)``."""
    return jnp.ones_like(y)


class LeakyReLU(NamedTuple):
  r"""Leaky ReLU, :math:`z` for :math:`z \ge 0` and ``negative_slope``
  :math:`\cdot z` below, as ``flax.linen.leaky_relu`` and
  ``torch.nn.LeakyReLU``. Invertible for any ``negative_slope > 0``.

  Attributes:
    negative_slope: the slope below 0, a Python number > 0 (default 0.01,
      flax's and PyTorch's).

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> act = bnjax.LeakyReLU(negative_slope=0.1)
    >>> act(jnp.array([-2.0, 3.0])), act.inverse(jnp.array([-0.2, 3.0]))
    (Array([-0.2,  3. ], dtype=float32), Array([-2.,  3.], dtype=float32))
  """

  negative_slope: float = 0.01

  def __call__(self, z: Array) -> Array:
    return jnp.where(z >= 0, z, self.negative_slope * z)

  def inverse(self, y: Array) -> Array:
    # min/max, not a select: XLA:CPU's reduction fusions take these in,
    # so the inverse is not written out as a full-size temporary.
    s = self.negative_slope
    return jnp.minimum(y, y / s) if s <= 1 else jnp.maximum(y, y / s)

  def slope(self, y: Array) -> Array:
    """The derivative at ``inverse(y)`` (1 at 0, as flax's)."""
    return jnp.where(y >= 0, 1.0, self.negative_slope).astype(y.dtype)


class ELU(NamedTuple):
  r"""ELU, :math:`z` for :math:`z > 0` and :math:`\alpha (e^z - 1)` below,
  as ``flax.linen.elu``.

  Its inverse :math:`\log(1 + y/\alpha)` loses precision as y nears
  :math:`-\alpha`: in float32, :math:`z < -15` (bfloat16: about -5) comes
  back as that bound. The gradient there carries the factor :math:`e^z`.

  Attributes:
    alpha: the negative saturation, a Python number > 0 (default 1).

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> bnjax.ELU(alpha=1.0).inverse(bnjax.ELU()(jnp.array([-1.0, 2.0])))
    Array([-1.,  2.], dtype=float32)
  """

  alpha: float = 1.0

  def __call__(self, z: Array) -> Array:
    return jnp.where(z > 0, z, self.alpha * jnp.expm1(jnp.minimum(z, 0)))

  def inverse(self, y: Array) -> Array:
    # Select-free, as LeakyReLU.inverse: y above 0, log1p(y / alpha) below,
    # clamped short of -1 (where y has lost z).
    lo = -1 + jnp.finfo(y.dtype).eps
    u = jnp.clip(y / self.alpha, lo, 0)
    return jnp.maximum(y, 0) + jnp.log1p(u)

  def slope(self, y: Array) -> Array:
    """The derivative at ``inverse(y)``: 1 above 0, ``y + alpha`` below."""
    return jnp.where(y > 0, 1.0, y + self.alpha)


Activation = Identity | LeakyReLU | ELU

_NAMES: dict[str, Activation] = {
  'identity': Identity(),
  'leaky_relu': LeakyReLU(),
  'elu': ELU(),
}
_RELU = (
  '{fn}: activation={a!r} (ReLU) cannot be inverted: its zeros lose x, '
  'and the backward recovers x_hat from the output at every position. Use '
  "activation='leaky_relu' (bnjax.LeakyReLU(negative_slope=0.01), "
  "InPlace-ABN's choice) or bnjax.batch_norm followed by jax.nn.relu"
)
_TYPE = (
  '{fn}: activation must be one of {names} or a bnjax.Identity, '
  'bnjax.LeakyReLU or bnjax.ELU, got {a!r}; e.g. '
  'activation=bnjax.LeakyReLU(negative_slope=0.2)'
)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A checked activation and ``scale_floor``: what the core takes."""

  activation: Activation
  scale_floor: float

  def check_dtype(self, fn: str, out_dtype: Any) -> None:
    """ELU's inverse needs y + alpha to a few digits: a half-precision
    output (the residual) keeps too few (bfloat16: 30% error at z = -5)."""
    if isinstance(self.activation, ELU) and jnp.finfo(out_dtype).bits < 32:
      raise ValueError(
        f'{fn}: ELU with a {jnp.dtype(out_dtype).name} output: the backward '
        'inverts the saved output, and near -alpha a half-precision ELU '
        'output has lost its input (bfloat16: 30% gradient error at z = -5); '
        "pass dtype=jnp.float32, or use activation='leaky_relu'"
      )

  def floor(self, scale: Array | None) -> Array | None:
    r""":math:`\gamma' = \operatorname{sign}(\gamma)\max(|\gamma|, floor)`
    (the sign bit decides at 0: -0.0 floors to -scale_floor), with
    :math:`\gamma`'s gradient passed through unchanged."""
    if scale is None:
      return None
    fl = jnp.asarray(self.scale_floor, scale.dtype)
    floored = jnp.where(jnp.signbit(scale), -fl, fl)
    g = jnp.where(jnp.abs(scale) < fl, floored, scale)
    return scale + lax.stop_gradient(g - scale)


def spec(fn: str, activation: Any, scale_floor: Any) -> Spec:
  """Checks ``activation`` and ``scale_floor`` (trace time, static)."""
  if isinstance(activation, str):
    if activation.lower() in ('relu', 'relu6'):
      raise ValueError(_RELU.format(fn=fn, a=activation))
    if activation not in _NAMES:
      raise ValueError(_TYPE.format(fn=fn, names=sorted(_NAMES), a=activation))
    activation = _NAMES[activation]
  elif getattr(activation, '__name__', None) in ('relu', 'relu6'):
    raise ValueError(_RELU.format(fn=fn, a=activation))
  elif type(activation) not in (Identity, LeakyReLU, ELU):
    raise TypeError(_TYPE.format(fn=fn, names=sorted(_NAMES), a=activation))
  params = activation._asdict()
  for name, v in params.items():
    params[name] = _positive(fn, f'{type(activation).__name__}.{name}', v)
  return Spec(
    type(activation)(**params), _positive(fn, 'scale_floor', scale_floor)
  )


def _positive(fn: str, name: str, v: Any) -> float:
  """A static, finite real number > 0 (it sets the compiled program)."""
  if isinstance(v, (bool, jnp.bool_)) or not isinstance(
    v, (int, float, jnp.integer, jnp.floating)
  ):
    raise TypeError(
      f'{fn}: {name} must be a Python number (it is static: part of the '
      f'compiled program), got {v!r} of type {type(v).__name__}'
    )
  try:
    v = float(v)
  except OverflowError:
    v = math.inf
  if not (math.isfinite(v) and v > 0):
    raise ValueError(f'{fn}: {name}={v} must be finite and > 0')
  # Applied in float32 (the statistics' dtype) or wider: a value that
  # rounds to 0 or inf there, or is subnormal, makes the backward's
  # division by it NaN.
  f32 = jnp.finfo(jnp.float32)
  if not float(f32.tiny) <= v <= float(f32.max):
    raise ValueError(
      f'{fn}: {name}={v} must be a normal float32 number, between '
      f'{float(f32.tiny):.3g} and {float(f32.max):.3g} (the backward divides '
      'by it)'
    )
  return v
