"""Scale-out measurements: the attack's throughput vs batch size and devices, and the paper-scale attack.

Usage (``scripts/bench/scale.py`` wires flags to :func:`run`)::

    from intriguing_jax import scale
    from intriguing_jax.configs import scale as scale_config
    result = scale.run(scale_config.get_config("full"), workdir="runs/scale")

``mode="throughput"``: per batch size B, ``attack.lbfgs_attack`` on B MNIST test digits (synthetic without
MNIST) toward seeded random wrong labels, one compile call then ``repeats`` timed calls; a row gives
examples/s (median wall time), examples per CPU-second, the first call's seconds, the load average, success
and mean distortion; with ``devices``, one child process per forced CPU device count. ``mode="full"``: the
training images attacked once through the resumable ``distributed.stream_map(jit=False)``, chunks sized to
device memory (compiled bytes per example of the logits x the c grid x the L-BFGS history).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from intriguing_jax import attack
from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import distributed
from intriguing_jax import models
from intriguing_jax import train


def validate(config: ml_collections.ConfigDict) -> attack.AttackOptions:
  """Checks ``config`` (configs/scale.py) before any work; returns its attack options."""
  if config.mode not in ("throughput", "full"):
    raise ValueError(f"scale: mode must be 'throughput' or 'full', got {config.mode!r}")
  optional = lambda v: [] if v is None else [v]
  counts = {"batch_sizes": config.batch_sizes, "devices": config.devices, "repeats": [config.repeats],
            "max_chunk_size": [config.max_chunk_size], "chunk_size": optional(config.chunk_size),
            "num_examples": optional(config.num_examples)}
  for field, values in counts.items():
    if any(not isinstance(v, int) or v < 1 for v in values):
      raise ValueError(f"scale: {field} must hold integers >= 1, got {values}")
  if not config.batch_sizes:
    raise ValueError("scale: batch_sizes is empty")
  models.get_model(config.model)  # an unknown name fails here, naming the known ones
  return attack.AttackOptions(**config.attack)


def load_model(config, workdir: Optional[str], data_dir: Optional[str]) -> Tuple[Any, Any]:
  """(model, variables): ``config.run_dir``'s run; else trained or restored in ``<workdir>/models``; else
  the model's random initial weights (throughput without a workdir)."""
  model = models.get_model(config.model)
  if config.run_dir:
    return model, train.load_run(config.run_dir, model)[0]
  if workdir:
    images, labels = data.load_mnist("train", data_dir)
    return train.get_or_train(config.model, images, labels, workdir=os.path.join(workdir, "models"))
  return model, model.init(jax.random.PRNGKey(0), np.zeros((1,) + data.IMAGE_SHAPE, np.float32))


def _test_digits(n: int, data_dir: Optional[str]) -> Tuple[np.ndarray, np.ndarray, str]:
  try:
    images, labels = data.load_mnist("test", data_dir)
    source = "mnist-test"
  except data.MnistError as e:
    logging.warning("MNIST not available (%s); using synthetic digits", e)
    (images, labels), source = data.synthetic_mnist(n, seed=0), "synthetic"
  reps = -(-n // images.shape[0])
  return np.concatenate([images] * reps)[:n], np.concatenate([labels] * reps)[:n], source


def throughput_rows(config, workdir: Optional[str] = None, data_dir: Optional[str] = None) -> List[Dict]:
  """One row per batch size, on the devices of this process (see the module docstring)."""
  options = validate(config)
  model, variables = load_model(config, workdir, data_dir)
  rows = []
  for b in config.batch_sizes:
    x, y, source = _test_digits(b, data_dir)
    targets = np.asarray(attack.random_targets(jax.random.PRNGKey(config.seed), y))
    call = lambda: jax.block_until_ready(attack.lbfgs_attack(model.apply, variables, x, targets, options))
    t0 = time.perf_counter()
    res = call()
    first, wall, cpu = time.perf_counter() - t0, [], []
    for _ in range(config.repeats):
      t0, c0 = time.perf_counter(), time.process_time()
      res = call()
      wall.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    sec = float(np.median(wall))
    rows.append({"devices": jax.device_count(), "backend": jax.default_backend(), "data": source, "batch": b,
                 "examples_per_s": b / sec, "seconds_per_batch": sec, "first_call_s": first,
                 "examples_per_cpu_s": b / max(float(np.median(cpu)), 1e-9),
                 "load_avg_1m": os.getloadavg()[0],
                 "success": float(np.mean(res.success)), "mean_distortion": float(np.mean(res.distortion))})
    logging.info("throughput: %s", rows[-1])
  return rows


def _relaunch(config, workdir: Optional[str], data_dir: Optional[str], devices: int) -> List[Dict]:
  """:func:`throughput_rows` in a child process on ``devices`` forced CPU devices."""
  child = ml_collections.ConfigDict(config.to_dict())
  child.devices = ()
  code = ("import json, sys, ml_collections; from intriguing_jax import scale; "
          "config = ml_collections.ConfigDict(json.loads(sys.argv[1])); "
          "rows = scale.throughput_rows(config, sys.argv[2] or None, sys.argv[3] or None); "
          "print('ROWS ' + json.dumps(rows))")
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  argv = [sys.executable, "-c", code, child.to_json(), workdir or "", data_dir or ""]
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"scale: the child on {devices} devices failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-4000:]}")
  return [r for line in proc.stdout.splitlines() if line.startswith("ROWS ") for r in json.loads(line[5:])]


def attack_training_set(config, workdir: str, data_dir: Optional[str] = None) -> Dict[str, Any]:
  """The full mode: the streamed, resumable attack of the training images; returns its summary."""
  options = validate(config)
  model, variables = load_model(config, workdir, data_dir)
  x, y = data.load_mnist("train", data_dir)
  x, y = x[:config.num_examples], y[:config.num_examples]
  targets = np.asarray(attack.random_targets(jax.random.PRNGKey(config.seed), y))
  chunk = config.chunk_size
  if chunk is None:
    per = distributed.estimate_bytes_per_example(model.apply, x[:1], broadcast=(variables,))
    per *= len(options.c_grid) * (2 * options.history_size + 4)
    chunk = distributed.pick_chunk_size(per, max_chunk_size=min(x.shape[0], config.max_chunk_size))
    logging.info("scale: chunk size %d from %d bytes per example", chunk, per)
  t0 = time.perf_counter()
  res = distributed.stream_map(
      lambda v, xb, tb: attack.lbfgs_attack(model.apply, v, xb, tb, options), x, targets,
      broadcast=(variables,), chunk_size=chunk, jit=False, name=f"attack-{config.model}",
      workdir=os.path.join(workdir, f"attack_{config.model}_train"),
      key=f"{dataclasses.asdict(options)} seed {config.seed}")
  ok = np.asarray(res.success)
  return {"model": config.model, "num_examples": int(x.shape[0]), "devices": jax.device_count(),
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "chunk_size": chunk,
          "seconds_this_run": time.perf_counter() - t0, "success": float(ok.mean()),
          "mean_distortion_success": float(np.mean(res.distortion[ok])) if ok.any() else None}


def run(config, workdir: Optional[str] = None, data_dir: Optional[str] = None) -> Dict[str, Any]:
  """Runs the configured measurement; with ``workdir`` writes ``results.json`` there (after every device
  count in throughput mode, so an interrupted run keeps what it measured). Returns the results."""
  validate(config)
  if config.mode == "full":
    if not workdir:
      raise ValueError("scale: mode 'full' needs a workdir (models and the resumable attack stream go there)")
    distributed.initialize()
    results = attack_training_set(config, workdir, data_dir)
  else:
    rows = [] if config.devices else throughput_rows(config, workdir, data_dir)
    for d in config.devices:
      rows += _relaunch(config, workdir, data_dir, d)
      if workdir and jax.process_index() == 0:
        checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), {"rows": rows, "complete": False})
    results = {"rows": rows, "complete": True}
  if workdir and jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), results)
  return results
