"""One process of the 2-process test: 2 CPU devices each, gloo collectives.

Run by tests/core/test_multihost.py as ``python -m tests._multihost_worker PORT ID
OUT``. Builds the 4-device global mesh, runs synced BN forward and backward
under shard_map by both sync paths (the psum path with the running mean
near the data and far from it), and writes its results to OUT (.npz).
"""

import sys

import jax


def main(port: int, pid: int, out: str):
  # Configured here, not at import: pytest's --doctest-modules imports every
  # module under tests/, and an import-time update once cut the whole test
  # process to 2 CPU devices (the pmap tests then failed "late in the suite").
  jax.config.update('jax_num_cpu_devices', 2)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=2,
    process_id=pid,
    initialization_timeout=60,
  )
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import bnjax
  from tests.core.test_multihost import CASES, FAR, problem

  x, w, stats = problem()
  mesh = Mesh(np.array(jax.devices()), ('d',))
  sharding = NamedSharding(mesh, P('d'))
  rows = x.shape[0] // jax.process_count()
  local = slice(pid * rows, (pid + 1) * rows)
  xg = jax.make_array_from_process_local_data(sharding, x[local], x.shape)
  wg = jax.make_array_from_process_local_data(sharding, w[local], w.shape)
  results = {'devices': jax.device_count()}
  for sync, st in CASES:
    stats_ = stats if st == 'near' else FAR
    bn = jax.shard_map(
      lambda x, s=stats_, sync=sync: bnjax.batch_norm(
        x, s, use_running_average=False, axis_name='d', momentum=0.9, sync=sync
      ),
      mesh=mesh,
      in_specs=P('d'),
      out_specs=(P('d'), P()),
    )

    def loss(x, w, bn=bn):
      y, new = bn(x)
      return jnp.mean(w * y), (y, new)

    dx, (y, new) = jax.jit(jax.grad(loss, has_aux=True))(xg, wg)
    key = f'{sync}_{st}'
    results[f'{key}_y'] = multihost_utils.process_allgather(y, tiled=True)
    results[f'{key}_dx'] = multihost_utils.process_allgather(dx, tiled=True)
    results[f'{key}_mean'] = np.asarray(new.mean)
    results[f'{key}_var'] = np.asarray(new.var)
  np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
