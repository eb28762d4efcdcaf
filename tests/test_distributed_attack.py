"""attack.lbfgs_attack on 4 forced CPU devices: sharded equals one device, ragged batch of 13, streamed.

The workers live in tests/test_distributed.py (run as a script in subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=<d>``; they assert the device count themselves). This is
a separate file because compiling the attack twice takes most of a minute on the loaded 2-core machine.
The 2-process x 2-device attack check (about 1-2 minutes) runs only with INTRIGUING_JAX_SLOW_TESTS=1.
"""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_ROOT, "tests", "test_distributed.py")


def test_attack_sharded_over_four_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  proc = subprocess.run([sys.executable, _WORKER, "attack"], env=env, capture_output=True, text=True,
                        timeout=300, cwd=_ROOT)
  assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
  assert "attack ok" in proc.stdout and "attack stream ok" in proc.stdout, proc.stdout


@pytest.mark.skipif(os.environ.get("INTRIGUING_JAX_SLOW_TESTS") != "1",
                    reason="slow (2 processes compile the attack); set INTRIGUING_JAX_SLOW_TESTS=1")
def test_attack_over_two_processes_equals_one_device():
  sys.path.insert(0, os.path.dirname(_WORKER))
  import test_distributed  # pylint: disable=g-import-not-at-top
  outs = test_distributed.run_two_processes(["multiprocess_attack"])
  for i, (rc, stdout, stderr) in enumerate(outs):
    assert rc == 0, f"process {i} failed:\n{stdout}\n{stderr[-4000:]}"
    assert f"process {i} attack ok" in stdout, stdout
