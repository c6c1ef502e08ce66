"""Two processes on 127.0.0.1 through jax.distributed: synced BN equals global
BN, by both sync paths (the psum path with a near and a far running
mean, which it no longer uses)."""

import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bnjax

TIMEOUT_S = 120


# (sync, running stats): 'near' is problem()'s, FAR is 25 std from the data
# (where the former running-mean psum fell back to the gather).
CASES = [('gather', 'near'), ('psum', 'near'), ('psum', 'far')]
FAR = bnjax.BatchStats(jnp.full(3, 55.0), jnp.full(3, 2.0))


def problem():
  rng = np.random.default_rng(0)
  x = (5.0 + 2.0 * rng.standard_normal((16, 3))).astype(np.float32)
  w = rng.standard_normal((16, 3)).astype(np.float32)
  stats = bnjax.BatchStats(jnp.full(3, 0.5), jnp.full(3, 2.0))
  return x, w, stats


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process_global_batch(tmp_path):
  port = _free_port()
  root = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )
  env = dict(
    os.environ,
    PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''),
    XLA_FLAGS='',
  )
  procs = []
  try:
    for pid in range(2):
      procs.append(
        subprocess.Popen(
          [
            sys.executable,
            '-m',
            'tests._multihost_worker',
            str(port),
            str(pid),
            str(tmp_path / f'out{pid}.npz'),
          ],
          cwd=root,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
    outs = [p.communicate(timeout=TIMEOUT_S)[0].decode() for p in procs]
  finally:
    for p in procs:  # no leftovers, even on failure or timeout
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]

  x, w, near = problem()
  for sync, st in CASES:
    stats = near if st == 'near' else FAR

    def loss(x, stats=stats):
      y, new = bnjax.batch_norm(
        x, stats, use_running_average=False, momentum=0.9
      )
      return jnp.mean(w * y), (y, new)

    dx, (y, new) = jax.grad(loss, has_aux=True)(x)
    for pid in range(2):
      r = np.load(tmp_path / f'out{pid}.npz')
      assert int(r['devices']) == 4
      k = f'{sync}_{st}'
      np.testing.assert_allclose(r[f'{k}_y'], y, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(r[f'{k}_dx'], dx, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(r[f'{k}_mean'], new.mean, rtol=1e-6)
      np.testing.assert_allclose(r[f'{k}_var'], new.var, rtol=1e-6)
