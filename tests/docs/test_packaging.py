"""Packaging facts: one version, declared floors that CI really tests, and
type hints that resolve."""

import importlib
import importlib.metadata
import inspect
import pathlib
import re
import tomllib
import typing

import bnjax
import bnjax.interop
import bnjax.linen
import bnjax.nnx
import bnjax.precise
import bnjax.training

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_version_matches_the_installed_metadata():
  assert importlib.metadata.version('bnjax') == bnjax.__version__


def test_public_api_type_hints_resolve():
  """Regression: typing.get_type_hints(bnjax.batch_norm) raised NameError
  (BatchStats was not imported where the annotation lives). Every public
  function is fully annotated, as the py.typed marker promises."""
  mods = [
    bnjax,
    bnjax.linen,
    bnjax.nnx,
    bnjax.interop,
    bnjax.precise,
    bnjax.training,
  ]
  try:
    mods.append(importlib.import_module('bnjax.equinox'))
  except ImportError:  # the equinox extra is absent
    pass
  for mod in mods:
    names = getattr(mod, '__all__', None) or [
      n for n in dir(mod) if not n.startswith('_')
    ]
    for name in names:
      obj = getattr(mod, name)
      if callable(obj) and getattr(obj, '__module__', '').startswith('bnjax'):
        typing.get_type_hints(obj)
      if inspect.isfunction(obj) and obj.__module__.startswith('bnjax'):
        sig = inspect.signature(obj)
        bare = [
          p
          for p, v in sig.parameters.items()
          if v.annotation is inspect.Parameter.empty
        ]
        assert not bare, (mod.__name__, name, bare)  # fully annotated
        assert sig.return_annotation is not inspect.Signature.empty, name


def _pins(path):
  pins = {}
  for line in (ROOT / path).read_text().splitlines():
    line = line.split('#')[0].strip()
    if line:
      name, version = line.split('==')
      pins[name] = version
  return pins


def test_declared_floors_are_the_versions_the_floor_job_installs():
  """pyproject's lower bounds for the runtime and test dependencies equal
  the exact versions .ci/floor tests the wheel with, and the floor job runs
  the library's test files."""
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  extras = project['optional-dependencies']
  reqs = (
    project['dependencies']
    + extras['test']
    + extras['equinox']
    + extras['haiku']
    + [r for r in extras['experiments'] if r.startswith('optax')]
  )
  floors = dict(
    re.match(r'([\w-]+)>=([\w.]+)$', r).groups() for r in reqs if '>=' in r
  )
  pins = _pins('.ci/floor.txt')
  for name, version in pins.items():
    assert floors.get(name) == version, (name, floors.get(name), version)
  floor_job = (ROOT / '.ci' / 'floor').read_text()
  assert re.search(
    r'^run tests/core tests/modules tests/interop$', floor_job, re.M
  )
  assert re.search(
    r'^BNJAX_STATS_PATH=accelerator run tests/core', floor_job, re.M
  )


def test_committed_results_are_strict_json():
  """Regression: experiments/results/non_iid.json held NaN, which strict
  JSON parsers reject; a diverged run's value is now null."""
  import json

  def reject(name):
    raise ValueError(f'non-strict JSON constant {name}')

  paths = sorted((ROOT / 'experiments' / 'results').glob('*.json')) + sorted(
    (ROOT / 'benchmarks' / 'results').glob('*.json')
  )
  assert paths
  for path in paths:
    json.loads(path.read_text(), parse_constant=reject)


def test_pre_commit_runs_the_static_checks_ci_runs():
  """.pre-commit-config.yaml's hooks are .ci/run's ruff check, ruff format
  --check (over the same paths) and mypy, as local hooks."""
  ci = (ROOT / '.ci' / 'run').read_text()
  paths = re.search(r'^lint=\((.*)\)$', ci, re.M).group(1)
  assert re.search(r'^ruff check "\$\{lint\[@\]\}"$', ci, re.M)
  assert re.search(r'^ruff format --check "\$\{lint\[@\]\}"$', ci, re.M)
  assert re.search(r'^mypy$', ci, re.M)
  hooks = (ROOT / '.pre-commit-config.yaml').read_text()
  assert 'repo: local' in hooks and 'repo: http' not in hooks
  entries = re.findall(r'entry: (.*)', hooks)
  assert entries == [
    f'ruff check {paths}',
    f'ruff format --check {paths}',
    'mypy',
  ], entries


def test_package_metadata_is_complete_for_an_index():
  """What an index shows: a readme, a license with its file, the Python
  requirement and a classifier for each supported Python (3.11 to 3.13,
  each a CI job), and the version from bnjax.__version__."""
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  assert project['readme'] == 'README.md'
  assert project['license'] == 'Apache-2.0'
  assert project['license-files'] == ['LICENSE']
  assert project['requires-python'] == '>=3.11'
  for py in ('3.11', '3.12', '3.13'):
    assert f'Programming Language :: Python :: {py}' in project['classifiers']
  assert project['dynamic'] == ['version']
  docs = project['optional-dependencies']['docs']
  assert 'bnjax[equinox]' in docs, 'the API reference documents bnjax.equinox'


def test_the_wheel_lists_every_package_of_bnjax():
  """Regression: bnjax/training/ became a package and the wheel, built from
  an explicit package list, left it out (the floor job, which tests the
  installed wheel, failed to import bnjax.training)."""
  listed = set(
    tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools'][
      'packages'
    ]
  )
  found = {
    '.'.join(p.parent.relative_to(ROOT).parts)
    for p in (ROOT / 'bnjax').rglob('__init__.py')
  }
  assert listed == found, (sorted(found - listed), sorted(listed - found))
