"""The scripts' flag wiring (``intriguing_jax.cli``): every script's ``--help`` exits 0 and lists the shared
flags; a misspelt config field is refused while the flags are parsed, before any work.

The scripts' experiments are tested elsewhere (test_reproduce_script.py, test_adversarial_training_script.py,
test_scale.py, ...). ``--help`` of all fourteen runs in one subprocess (the imports are paid once): each
script is executed with ``runpy`` as ``__main__``; the absl flags it defined are deleted before the next.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(_REPO))
                 for p in (*_REPO.glob("scripts/*.py"), *_REPO.glob("scripts/bench/*.py")))

_RUNNER = r"""
import contextlib, io, json, runpy, sys
from absl import app, flags
app.define_help_flags()
results = {}
for script in sys.argv[1:]:
  before, out, err = set(flags.FLAGS), io.StringIO(), io.StringIO()
  sys.argv, code = [script, "--help"], None
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
      code = e.code
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  results[script] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()[-2000:]}
print(json.dumps(results))
"""


def _run(args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], cwd=_REPO, capture_output=True, text=True, env=env,
                        timeout=timeout)


@pytest.fixture(scope="module")
def helps():
  proc = _run(["-c", _RUNNER, *SCRIPTS])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fourteen_scripts():
  assert len(SCRIPTS) == 14, SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_lists_the_shared_flags(helps, script):
  res = helps[script]
  assert res["code"] == 0, res["stderr"]
  for flag in ("--config:", "--workdir:", "--data_dir:"):
    assert flag in res["stdout"], (flag, res["stdout"][-2000:])
  doc = (_REPO / script).read_text().split('"""')[1].strip().splitlines()[0]
  assert doc in res["stdout"]   # the docstring (command, runtime, result) is the help text


@pytest.mark.parametrize("config", [[], ["--config=intriguing_jax/configs/mnist_summary.py"]])
def test_misspelt_config_field_is_refused_before_any_work(config):
  """Refused while the flag is defined (default config) or parsed (a config named), before ``main`` runs."""
  proc = _run(["scripts/mnist_summary.py", *config, "--config.bogus=1", "--data_dir=/nonexistent"],
              timeout=60)
  assert proc.returncode != 0
  assert "unknown config field 'bogus' among ['--config.bogus']" in proc.stderr, proc.stderr[-2000:]
  assert "MNIST from" not in proc.stdout   # main never started


_CACHE_PROBE = r"""
import sys, jax, jax.numpy as jnp
from intriguing_jax import cli
def main(argv):
  del argv
  jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
  print("CACHE", jax.config.jax_compilation_cache_dir)
  import os; print("OPENBLAS", os.environ.get("OPENBLAS_NUM_THREADS"))
cli.run(main)
"""


@pytest.mark.parametrize("setting", ["default", "env", "off"])
def test_scripts_turn_on_the_compilation_cache_and_limit_openblas(tmp_path, setting):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "OPENBLAS_NUM_THREADS")}
  env.update(HOME=str(tmp_path), JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  want = {"default": tmp_path / ".cache" / "intriguing_jax" / "jax_cache", "env": tmp_path / "mine",
          "off": None}[setting]
  if setting != "default":   # and a user's own OpenBLAS thread count is kept
    env.update(JAX_COMPILATION_CACHE_DIR=str(want or ""), OPENBLAS_NUM_THREADS="2")
  proc = subprocess.run([sys.executable, "-c", _CACHE_PROBE], cwd=_REPO, capture_output=True, text=True,
                        env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("CACHE")][-1]
  assert f"OPENBLAS {1 if setting == 'default' else 2}" in proc.stdout.splitlines()
  if want is None:
    assert line.strip() in ("CACHE", "CACHE None") and not (tmp_path / ".cache").exists()
  else:
    assert line == f"CACHE {want}"
    assert any(want.iterdir())   # the compiled program was stored
