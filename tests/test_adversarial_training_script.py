"""End-to-end test of scripts/adversarial_training.py and scripts/train.py (flag wiring), in subprocesses.

Subprocesses, not in-process ``main``s: the scripts define absl flags of the same names. The experiments
themselves are tested in-process (``tests/test_adversarial_training.py``, ``tests/test_train.py``).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import write_synthetic_idx

_SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def _run(script, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(_SCRIPTS / script), *args], capture_output=True, text=True, env=env,
                        timeout=600)


@pytest.mark.slow
def test_adversarial_training_script_end_to_end(synthetic_idx_dir, tmp_path):
  workdir = tmp_path / "adv"
  args = [f"--workdir={workdir}", f"--data_dir={synthetic_idx_dir}",
          "--config=intriguing_jax/configs/adversarial_training.py:smoke", "--config.runs=('weight_decay',)",
          "--config.num_train=256", "--config.train.epochs=1", "--config.train.batch_size=64",
          "--config.num_attack=2", "--config.chunk_size=2", "--config.eval_attack.maxiter=3",
          "--config.eval_attack.refine=False"]
  proc = _run("adversarial_training.py", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((workdir / "results.json").read_text())
  assert list(res["per_seed"]) == ["weight_decay"] and res["num_attacked"] == 2
  assert res["config"]["train"]["epochs"] == 1 and (workdir / "report.html").is_file()
  assert (workdir / "weight_decay" / "final.msgpack").stat().st_mode & 0o044  # readable by others (umask 022)
  flags_txt = (workdir / "flags.txt").read_text()   # the command and every flag's value
  assert "--config.num_train=256" in flags_txt.splitlines()[0] and "--workdir=" in flags_txt
  bad = _run("adversarial_training.py", f"--workdir={workdir}", "--config.pool.attack.bogus=1")
  assert bad.returncode != 0 and "bogus" in bad.stderr and "restored" not in bad.stderr
  # Other data (here a smaller test set) or another model in the same workdir: refused, not restored.
  other = write_synthetic_idx(tmp_path / "other_mnist", num_test=64)
  for changed, named in ((f"--data_dir={other}", "data_fingerprint"), ("--config.model=fc200-200-10", "model")):
    proc = _run("adversarial_training.py", *args, changed)
    assert proc.returncode != 0 and f"other settings ({named}" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_scripts_help_exits_zero():
  for script in ("adversarial_training.py", "train.py"):
    proc = _run(script, "--help")
    assert proc.returncode == 0 and "--workdir" in proc.stdout, (script, proc.stderr[-2000:])
