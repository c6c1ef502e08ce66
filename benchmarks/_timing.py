"""Shared timing helpers: interleaved medians, compile time, environment."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

MALLOC = (
  'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
  'glibc.malloc.trim_threshold=17179869184'
)


def ensure_malloc_env():
  """Re-executes the script with the allocator setting that steadies timings."""
  if os.environ.get('GLIBC_TUNABLES') != MALLOC:
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC)
    # Run as `python -m benchmarks.NAME`: re-execute as a module too (the
    # script path alone loses the package, and its imports fail).
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    argv = ['-m', spec.name, *sys.argv[1:]] if spec else sys.argv
    os.execvpe(sys.executable, [sys.executable, *argv], env)


def interleaved_samples(fns: dict, args: dict, rounds: int, inner: int) -> dict:
  """Seconds per call of each fn in every round, timed A B A B ... after
  warm-up. Round i of each fn ran back to back, so per-round ratios pair up
  samples taken under the same machine load."""
  import jax

  for k, f in fns.items():
    for _ in range(2):
      jax.block_until_ready(f(*args[k]))
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t = time.perf_counter()
      for _ in range(inner):
        out = f(*args[k])
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t) / inner)
  return times


def medians(samples: dict) -> dict:
  return {k: float(np.median(v)) for k, v in samples.items()}


def interleaved(fns: dict, args: dict, rounds: int, inner: int) -> dict:
  """Median seconds per call of each fn, timed A B A B ... after warm-up."""
  return medians(interleaved_samples(fns, args, rounds, inner))


def ratio_quartiles(num, den) -> tuple[float, float]:
  """25th and 75th percentiles of the paired per-round ratios num_i / den_i:
  the spread of a ratio on a noisy machine."""
  r = np.asarray(num) / np.asarray(den)
  return float(np.percentile(r, 25)), float(np.percentile(r, 75))


def ratio_columns(samples: dict, num='bnjax', den='flax', prefix='') -> dict:
  """The timing columns of a results row, from interleaved samples: each
  side's median in ms (``<den>_ms``, ``<num>_ms``), the ratio of the medians
  num / den (``<prefix>ratio``) and the paired per-round ratios' quartiles
  (``<prefix>ratio_q25``, ``<prefix>ratio_q75``)."""
  t = medians(samples)
  q25, q75 = ratio_quartiles(samples[num], samples[den])
  return {
    f'{den}_ms': t[den] * 1e3,
    f'{num}_ms': t[num] * 1e3,
    f'{prefix}ratio': t[num] / t[den],
    f'{prefix}ratio_q25': q25,
    f'{prefix}ratio_q75': q75,
  }


def compile_columns(times: dict) -> dict:
  """The compile-time columns of a results row, from paired rounds of
  compile seconds ``{'flax': [...], 'bnjax': [...]}``: each side's median
  (``flax_s``, ``bnjax_s``), their ratio, the sorted per-round ratios, and
  every round's seconds (``flax_all_s``, ``bnjax_all_s``)."""
  med = {k: float(np.median(times[k])) for k in ('flax', 'bnjax')}
  return dict(
    flax_s=med['flax'],
    bnjax_s=med['bnjax'],
    ratio=med['bnjax'] / med['flax'],
    pair_ratios=sorted(
      b / f for b, f in zip(times['bnjax'], times['flax'], strict=True)
    ),
    flax_all_s=list(times['flax']),
    bnjax_all_s=list(times['bnjax']),
  )


def compile_seconds(make_fn, args, repeats: int) -> float:
  """Median wall time of trace + lower + compile of a fresh function."""
  ts = []
  for _ in range(repeats):
    f = make_fn()
    t = time.perf_counter()
    f.lower(*args).compile()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def environment() -> dict:
  import flax
  import jax

  try:
    commit = subprocess.run(
      ['git', 'rev-parse', '--short', 'HEAD'],
      capture_output=True,
      text=True,
      check=False,
    ).stdout.strip()
    status = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no'],
      capture_output=True,
      text=True,
      check=False,
    ).stdout.splitlines()
    # Dirty means the measured code differs from the commit: results and
    # READMEs, which the benchmarks themselves rewrite, do not count.
    dirty = any(
      not (line[3:].startswith('benchmarks/results/') or line.endswith('.md'))
      for line in status
    )
  except OSError:
    commit, dirty = '', None
  return dict(
    date=datetime.date.today().isoformat(),
    jax=jax.__version__,
    dirty=dirty,
    flax=flax.__version__,
    python=platform.python_version(),
    machine=f'{platform.machine()}, {os.cpu_count()} cores',
    backend=jax.default_backend(),
    devices=str(jax.devices()[0].device_kind),
    commit=commit,
    malloc=os.environ.get('GLIBC_TUNABLES', ''),
  )


def parse_args(doc: str, argv=None, extra=None):
  """The scripts' shared CLI: --smoke, plus the allocator setting otherwise."""
  import argparse

  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument('--smoke', action='store_true', help='seconds-long check')
  if extra is not None:
    extra(p)
  args = p.parse_args(argv)
  if not args.smoke:
    ensure_malloc_env()
  return args


RESULTS = pathlib.Path(__file__).parent / 'results'


def runs(name: str) -> list[dict]:
  """Every recorded run of benchmarks/results/<name>.json, oldest first.

  Each run carries its ``env`` (date, commit, dirty flag, versions, machine),
  so a range quoted across runs can be computed from the records.
  """
  import json

  path = RESULTS / f'{name}.json'
  if not path.exists():
    return []
  return json.loads(path.read_text())['runs']


def latest(name: str) -> dict:
  """The newest run of results/<name>.json."""
  recorded = runs(name)
  if not recorded:
    raise FileNotFoundError(
      f'benchmarks/results/{name}.json has no run: '
      f'run python -m benchmarks run {name}'
    )
  return recorded[-1]


def write_result(name: str, out: dict, allow_nan: bool = False):
  """Appends one run to benchmarks/results/<name>.json, keeping the earlier
  ones (strict JSON: a NaN must be written as null unless allowed)."""
  import json

  path = RESULTS / f'{name}.json'
  history = runs(name)
  path.write_text(
    json.dumps({'runs': history + [out]}, indent=1, allow_nan=allow_nan)
  )
  return path
