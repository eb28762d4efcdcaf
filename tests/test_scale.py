"""Tests of intriguing_jax.scale and its script (scripts/bench/scale.py): config validation, the throughput
table end to end on synthetic digits, --help."""

import os
import subprocess
import sys

import pytest

from intriguing_jax import scale
from intriguing_jax.configs import scale as scale_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("field, value, match", [
    ("mode", "fast", "mode"), ("batch_sizes", (16, 0), "batch_sizes"), ("devices", (2, -1), "devices"),
    ("repeats", 0, "repeats"), ("model", "resnet7", "resnet7")])
def test_validate_refuses_bad_configs_by_name(field, value, match):
  config = scale_config.get_config()
  scale.validate(config)
  config[field] = value
  with pytest.raises((ValueError, KeyError), match=match):
    scale.validate(config)


def test_validate_refuses_bad_attack_options_and_presets():
  config = scale_config.get_config("smoke")
  assert scale.validate(config).maxiter == 5
  config.attack.solver = "newton"
  with pytest.raises(ValueError, match="solver"):
    scale.validate(config)
  with pytest.raises(ValueError, match="unknown preset"):
    scale_config.get_config("huge")


@pytest.mark.slow
def test_throughput_table_on_synthetic_digits(tmp_path):
  config = scale_config.get_config("smoke")
  result = scale.run(config, data_dir=str(tmp_path / "no_mnist_here"))   # falls back to synthetic digits
  (row,) = result["rows"]
  assert row["batch"] == 4 and row["data"] == "synthetic" and row["devices"] >= 1
  assert row["examples_per_s"] > 0 and 0.0 <= row["success"] <= 1.0 and row["mean_distortion"] > 0


@pytest.mark.slow
def test_script_help_exits_0_and_bad_config_fails_before_any_work():
  script = os.path.join(_ROOT, "scripts", "bench", "scale.py")
  for argv in ([script, "--help"], [os.path.join(_ROOT, "scripts", "mnist_summary.py"), "--help"]):
    proc = subprocess.run([sys.executable] + argv, capture_output=True, text=True, timeout=120, cwd=_ROOT)
    assert proc.returncode == 0 and "--data_dir" in proc.stdout, proc.stderr[-2000:]
  proc = subprocess.run([sys.executable, script, "--config.mode=fast"], capture_output=True, text=True,
                        timeout=120, cwd=_ROOT)
  assert proc.returncode != 0 and "mode must be" in proc.stderr, proc.stderr[-2000:]
