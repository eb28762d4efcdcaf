"""attack.lbfgs_attack over several devices: 4 forced CPU devices (ragged batch, streamed) and 2 processes.

The workers are this file run as a script in subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=<d>`` (the device count is fixed when jax starts). The
2-process x 2-device check (1-2 minutes) runs only with INTRIGUING_JAX_SLOW_TESTS=1.
"""

import os
import socket
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OPTS = dict(maxiter=30, c_grid=(0.1, 1.0, 10.0), num_bisection=0, refine_steps=10, history_size=5)


def _env(num_devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  return env


@pytest.mark.slow
def test_attack_sharded_over_four_devices_equals_one_device():
  proc = subprocess.run([sys.executable, __file__, "four_devices"], env=_env(4), capture_output=True,
                        text=True, timeout=300, cwd=_ROOT)
  assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
  assert all(f"{what} ok" in proc.stdout for what in ("attack", "attack stream", "nan count")), proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("INTRIGUING_JAX_SLOW_TESTS") != "1",
                    reason="slow (2 processes compile the attack); set INTRIGUING_JAX_SLOW_TESTS=1")
def test_attack_over_two_processes_equals_one_device():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, __file__, "two_processes"], cwd=_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(_env(2), JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))) for i in range(2)]
  for i, p in enumerate(procs):
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, f"process {i} failed:\n{stdout}\n{stderr[-4000:]}"
    assert f"process {i} attack ok" in stdout, stdout


def _problem(b):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  params = {"w1": jnp.asarray(0.5 * rng.randn(64, 32), jnp.float32),
            "w2": jnp.asarray(rng.randn(32, 10), jnp.float32)}
  x = rng.uniform(0, 1, (b, 8, 8, 1)).astype(np.float32)
  targets = ((np.arange(b) * 7 + 3) % 10).astype(np.int32)
  return (lambda p, z: jax.nn.sigmoid(z.reshape(z.shape[0], -1) @ p["w1"]) @ p["w2"]), params, x, targets


def _four_devices():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from intriguing_jax import attack, distributed  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4, jax.devices()
  apply_fn, params, x, targets = _problem(13)               # ragged: padded to 16 on 4 devices
  opts = attack.AttackOptions(**_OPTS)
  r1 = attack.lbfgs_attack(apply_fn, params, x, targets, opts, shard=False)
  r4 = attack.lbfgs_attack(apply_fn, params, x, targets, opts, shard=True)
  assert r4.x_adv.shape == x.shape and len(r4.x_adv.sharding.device_set) == 4
  assert np.asarray(r1.success).mean() > 0.5
  np.testing.assert_array_equal(np.asarray(r4.success), np.asarray(r1.success))
  np.testing.assert_allclose(np.asarray(r4.x_adv), np.asarray(r1.x_adv), atol=1e-4)
  np.testing.assert_allclose(np.asarray(r4.distortion), np.asarray(r1.distortion), rtol=1e-3, atol=1e-5)
  print("attack ok")
  rs = distributed.stream_map(lambda p, xb, tb: attack.lbfgs_attack(apply_fn, p, xb, tb, opts), x, targets,
                              broadcast=(params,), chunk_size=16, jit=False)   # padded like r4: same program
  np.testing.assert_array_equal(rs.success, np.asarray(r4.success))
  np.testing.assert_allclose(rs.x_adv, np.asarray(r4.x_adv), atol=1e-4)
  print("attack stream ok")
  nan_params = jax.tree_util.tree_map(lambda a: np.full_like(a, np.nan), params)
  try:     # the error counts the given examples, not the padding
    attack.lbfgs_attack(apply_fn, nan_params, x, targets, opts, shard=True)
    raise AssertionError("no error on NaN params")
  except ValueError as e:
    assert "for 13 of 13 examples" in str(e), str(e)
  print("nan count ok")


def _two_processes():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from intriguing_jax import attack, distributed  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert distributed.initialize() is True and jax.device_count() == 4
  apply_fn, params, x, targets = _problem(13)
  opts = attack.AttackOptions(**_OPTS)
  res = attack.lbfgs_attack(apply_fn, params, x, targets, opts)            # sharded over 2 x 2, gathered
  ref = attack.lbfgs_attack(apply_fn, params, x, targets, opts, shard=False)   # this process alone
  np.testing.assert_array_equal(np.asarray(res.success), np.asarray(ref.success))
  np.testing.assert_allclose(np.asarray(res.x_adv), np.asarray(ref.x_adv), atol=1e-4)
  print(f"process {jax.process_index()} attack ok")


if __name__ == "__main__":
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_numpy_rank_promotion", "raise")
  {"four_devices": _four_devices, "two_processes": _two_processes}[sys.argv[1]]()
