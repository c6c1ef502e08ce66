"""The runner of the bad-input cases (tests/badinput/test_*.py's CASES).

A case is ``(category, bad value, exception type, piece of the message)``:
the call with the bad value swapped into a good call raises that type with
that piece, and the message names the argument (or, for a state's field,
the field), and it starts with the name called (``bnjax.<module>.<name>:``,
one form everywhere). A 'traced' case passes its value traced under ``jax.jit`` and
``checkify``, where a value only known at run time gets a checkify check.
An exception type of None: the input is computable, and the call returns
the right number; the piece is then a function that checks the result.
"""

import jax
import pytest
from jax.experimental import checkify

FIELDS = ('mean', 'var', 'std', 'm2', 'count', 'weight')


def run_case(good, name, arg, case):
  """Runs one case against ``good`` (name -> (function, kwargs), or a
  function making them afresh, for a model the call changes): the
  exception and message piece, and that the message names the argument
  (or, for a state's field, the field)."""
  category, value, exc, piece = case
  fn, kw = good[name]() if callable(good[name]) else good[name]
  if exc is None:
    piece(fn(**{**kw, arg: value}))
    return
  if category == 'traced':
    f = jax.jit(lambda v: fn(**{**kw, arg: v}))
    call = lambda: checkify.checkify(f, errors=checkify.user_checks)(value)[
      0
    ].throw()
  else:
    call = lambda: fn(**{**kw, arg: value})
  with pytest.raises(exc) as info:
    call()
  msg = str(info.value)
  assert piece in msg, (piece, msg)
  named = arg in msg or (
    category in ('corrupt-state', 'shape', 'dtype')
    and any(f in msg for f in FIELDS)
  )
  assert named, (arg, msg)
  # One prefix form: the public name the user called (issue 42). JAX's own
  # errors (an unbound axis name) and checkify's run-time checks excepted.
  if category != 'traced' and not isinstance(info.value, NameError):
    assert msg.startswith(f'{name}: '), (name, msg)


def all_cases(cases):
  return [
    pytest.param(name, arg, case, id=f'{name}-{arg}-{case[0]}-{i}')
    for name, args in cases.items()
    for arg, cs in args.items()
    if not isinstance(cs, str)
    for i, case in enumerate(cs)
  ]
