"""The bad-input rule, by construction: every argument of every public
callable of every public module has bad-input cases or a stated exemption.

The cases are the union of the ``CASES`` of every tests/badinput/test_*.py
(``{callable: {argument: [(category, value, exception, message piece)] or
'exempt: <reason>'}}``) and tests/core/test_errors.py's
``BN_ARGUMENT_CASES`` (for ``bnjax.batch_norm``). A public callable is a
function or class in a module's ``__all__``: a class's constructor arguments
(a flax linen module's dataclass fields, less ``parent`` and ``name``) under
its name, and, where bnjax defines ``__call__``, that call's arguments under
``<name>.__call__``. NamedTuple state types are plain data: their fields
carry exemptions that say so (their ``init_*`` functions and every function
that reads a state check it). Adding a public callable or an argument
without cases fails ``test_every_public_argument_has_cases_or_an_exemption``.
"""

import dataclasses
import importlib
import importlib.util
import inspect
import pathlib
import sys
import types

import flax.linen as nn
import pytest

MODULES = (
  'bnjax',
  'bnjax.linen',
  'bnjax.nnx',
  'bnjax.equinox',
  'bnjax.training',
  'bnjax.interop',
  'bnjax.precise',
)
CATEGORIES = {
  'type',
  'dtype',
  'shape',
  'range',
  'nonfinite',
  'traced',
  'corrupt-state',
}
HERE = pathlib.Path(__file__).parent
ERRORS = HERE.parent / 'core' / 'test_errors.py'


def _load(path: pathlib.Path, names: tuple[str, ...]):
  """The module at path: the one pytest imported, if any, else a fresh one."""
  for name in names:
    mod = sys.modules.get(name)
    if mod is not None and pathlib.Path(mod.__file__).resolve() == path:
      return mod
  spec = importlib.util.spec_from_file_location(f'_coverage_{path.stem}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def cases() -> dict[str, dict[str, list | str]]:
  """The union of every file's CASES, and batch_norm's."""
  union: dict[str, dict[str, list | str]] = {}
  for path in sorted(HERE.glob('test_*.py')):
    if path.name == pathlib.Path(__file__).name:
      continue
    mod = _load(path.resolve(), (f'badinput.{path.stem}', path.stem))
    for name, args in mod.CASES.items():
      union.setdefault(name, {}).update(args)
  errors = _load(ERRORS.resolve(), ('test_errors', 'core.test_errors'))
  union.setdefault('bnjax.batch_norm', {}).update(errors.BN_ARGUMENT_CASES)
  return union


def _params(f) -> list[str]:
  return [p for p in inspect.signature(f).parameters if p != 'self']


def _constructor(cls) -> list[str]:
  if issubclass(cls, nn.Module):
    return [
      f.name
      for f in dataclasses.fields(cls)
      if f.name not in ('parent', 'name')
    ]
  return _params(cls)


def _own_call(cls) -> bool:
  return any(
    k.__module__.startswith('bnjax') and '__call__' in vars(k)
    for k in cls.__mro__
  )


def required(module) -> set[tuple[str, str]]:
  """Every (callable, argument) of the public callables of ``module``."""
  out = set()
  for name in module.__all__:
    obj = getattr(module, name)
    full = f'{module.__name__}.{name}'
    if inspect.isclass(obj):
      if issubclass(obj, tuple) and hasattr(obj, '_fields'):
        # A NamedTuple state: plain data, its fields exempt with a reason.
        out |= {(full, f) for f in obj._fields}
        continue
      out |= {(full, p) for p in _constructor(obj)}
      if _own_call(obj):
        out |= {(f'{full}.__call__', p) for p in _params(obj.__call__)}
    elif callable(obj):
      out |= {(full, p) for p in _params(obj)}
  return out


def missing(module, union) -> list[tuple[str, str]]:
  return sorted(
    (name, arg)
    for name, arg in required(module)
    if arg not in union.get(name, {})
  )


@pytest.mark.parametrize('module', MODULES)
def test_every_public_argument_has_cases_or_an_exemption(module):
  gaps = missing(importlib.import_module(module), cases())
  assert not gaps, f'add bad-input cases (tests/badinput) for {gaps}'


def test_cases_are_well_formed_and_name_real_arguments():
  union = cases()
  known = set().union(*(required(importlib.import_module(m)) for m in MODULES))
  for name, args in union.items():
    for arg, entry in args.items():
      assert (name, arg) in known, f'{name}({arg}) is not a public argument'
      if isinstance(entry, str):
        assert entry.startswith('exempt: ') and len(entry) > 12, entry
        continue
      assert entry, f'{name}({arg}): no cases and no exemption'
      for case in entry:
        category, _, exc, piece = case
        assert category in CATEGORIES, (name, arg, category)
        if exc is None:  # the right number, computed: a check of it
          assert category == 'corrupt-state' and callable(piece), case
          continue
        assert isinstance(exc, type) and issubclass(exc, Exception), case
        assert isinstance(piece, str) and piece, case


def test_the_rule_fails_for_an_added_callable_or_argument():
  fake = types.ModuleType('bnjax.interop')

  def momentum_to_torch(m, rounding):  # an argument added to a callable
    return m

  def shiny(x, *, level=1):  # a callable added to a module
    return x

  class Layer(nn.Module):  # a linen module: its fields
    features: int = 3

    def __call__(self, x, train):
      return x

  for f in (momentum_to_torch, shiny, Layer):
    f.__module__ = 'bnjax.interop'
  fake.momentum_to_torch, fake.shiny, fake.Layer = (
    momentum_to_torch,
    shiny,
    Layer,
  )
  fake.__all__ = ['momentum_to_torch', 'shiny', 'Layer']
  assert missing(fake, cases()) == [
    ('bnjax.interop.Layer', 'features'),
    ('bnjax.interop.Layer.__call__', 'train'),
    ('bnjax.interop.Layer.__call__', 'x'),
    ('bnjax.interop.momentum_to_torch', 'rounding'),
    ('bnjax.interop.shiny', 'level'),
    ('bnjax.interop.shiny', 'x'),
  ]
