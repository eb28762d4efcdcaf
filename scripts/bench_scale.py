r"""Scale-out benchmark: attack throughput (examples/s) vs batch size and vs number of devices.

Scaling curve on forced CPU devices (the script re-launches itself once per device count with
``XLA_FLAGS=--xla_force_host_platform_device_count=<d>``; on this 2-core machine about 10 minutes, see
notes/scale.md for the measured table)::

    python scripts/bench_scale.py --devices=1,2,4 --batch_sizes=16,64,256 --out=runs/bench_scale.json

On an accelerator, use the devices that are there (no re-launch)::

    python scripts/bench_scale.py --devices=0 --batch_sizes=256,1024,4096,16384

The full paper-scale attack: FC100-100-10 (trained with its default recipe, or restored from --workdir)
attacked on all 60,000 MNIST training images, each toward a seeded random wrong label, streamed in chunks
sized to device memory (``distributed.stream_map``; a killed run resumes from the last finished chunk)::

    python scripts/bench_scale.py --mode=full --workdir=runs/scale --chunk_size=0

Prints the table (devices, batch, examples/s, seconds per batch, examples per CPU-second -- the figure that
survives a machine shared with other jobs --, first-call (compile) seconds, load average, success rate) and,
with --out, writes it as JSON (after each device count, so an interrupted run keeps what it measured). The model of the throughput mode is FC100-100-10 with its random initial weights
(or a trained one: --run_dir, or --workdir for train.get_or_train); the images are real MNIST test digits when available, else synthetic.
Throughput numbers are steady-state: the first call of each shape (compilation) is timed separately.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "throughput", ["throughput", "full"],
                  "throughput: the table vs batch size and devices; full: attack every training image once.")
flags.DEFINE_list("devices", ["1", "2", "4"],
                  "Forced CPU device counts to re-launch with; 0 = the devices present (no re-launch).")
flags.DEFINE_list("batch_sizes", ["16", "64", "256"], "Examples per attack call.")
flags.DEFINE_integer("repeats", 2, "Timed calls per batch size (after one compile call).", lower_bound=1)
flags.DEFINE_string("model", "fc100-100-10", "Model name (models.get_model / train.RECIPES).")
flags.DEFINE_string("workdir", None, "Trained models (train.get_or_train) and the full-mode attack stream.")
flags.DEFINE_string("run_dir", None, "A finished training run (train.load_run: final.msgpack + result.json) "
                    "to attack instead of training/restoring one in --workdir.")
flags.DEFINE_integer("maxiter", 100, "L-BFGS iterations per solve.", lower_bound=1)
flags.DEFINE_integer("num_bisection", 10, "Bisection rounds on c.", lower_bound=0)
flags.DEFINE_integer("chunk_size", 0, "Full mode: examples per chunk; 0 = from the device memory "
                     "(distributed.pick_chunk_size with the compiled memory estimate).", lower_bound=0)
flags.DEFINE_integer("max_chunk_size", 10000, "Full mode: cap of the memory-derived chunk size (smaller chunks "
                     "= finer resumption).", lower_bound=1)
flags.DEFINE_integer("num_examples", 0, "Full mode: attack only the first N training images (0 = all).",
                     lower_bound=0)
flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR, else tfds).")
flags.DEFINE_string("out", None, "Write the rows as JSON here.")
flags.DEFINE_boolean("child", False, "Internal: run one device count in this process and print JSON rows.")


_DATA = ["mnist-test"]


def _images(n: int) -> np.ndarray:
  from intriguing_jax import data  # pylint: disable=g-import-not-at-top
  try:
    images, labels = data.load_mnist("test", FLAGS.data_dir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("MNIST not available (%s); using synthetic digits", e)
    images, labels = data.synthetic_mnist(max(n, 1), seed=0)
    _DATA[0] = "synthetic"
  reps = -(-n // images.shape[0])
  return np.concatenate([images] * reps)[:n], np.concatenate([labels] * reps)[:n]


def _model():
  import jax  # pylint: disable=g-import-not-at-top
  from intriguing_jax import data, models, train  # pylint: disable=g-import-not-at-top
  if FLAGS.run_dir:
    model = models.get_model(FLAGS.model)
    variables, result = train.load_run(FLAGS.run_dir, model)
    logging.info("attacking %s from %s (train error %s)", FLAGS.model, FLAGS.run_dir, result.get("train_error"))
    return model, variables
  if FLAGS.workdir:
    images, labels = data.load_mnist("train", FLAGS.data_dir)
    return train.get_or_train(FLAGS.model, images, labels, workdir=os.path.join(FLAGS.workdir, "models"))
  model = models.get_model(FLAGS.model)
  return model, model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))


def _attack_options():
  return dict(maxiter=FLAGS.maxiter, num_bisection=FLAGS.num_bisection)


def _child_rows():
  """Throughput rows for the devices of this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from intriguing_jax import attack  # pylint: disable=g-import-not-at-top
  model, variables = _model()
  rows = []
  for b in [int(s) for s in FLAGS.batch_sizes]:
    x, y = _images(b)
    targets = np.asarray(attack.random_targets(jax.random.PRNGKey(0), y))
    run = lambda: jax.block_until_ready(attack.lbfgs_attack(model.apply, x, targets, params=variables,
                                                            **_attack_options()))
    t0 = time.perf_counter()
    res = run()
    compile_s = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(FLAGS.repeats):
      t0, c0 = time.perf_counter(), time.process_time()
      res = run()
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    sec = float(np.median(times))
    cpu_sec = float(np.median(cpu))
    rows.append({"devices": jax.device_count(), "backend": jax.default_backend(), "data": _DATA[0], "batch": b,
                 "examples_per_s": b / sec, "seconds_per_batch": sec, "first_call_s": compile_s,
                 "examples_per_cpu_s": b / max(cpu_sec, 1e-9), "load_avg_1m": os.getloadavg()[0],
                 "success": float(np.mean(np.asarray(res.success))),
                 "mean_distortion": float(np.mean(np.asarray(res.distortion)))})
    logging.info("%s", rows[-1])
    if FLAGS.child:
      print("ROW " + json.dumps(rows[-1]), flush=True)
  return rows


def _relaunch(d: int):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}", JAX_PLATFORMS="cpu")
  argv = [sys.executable, os.path.abspath(__file__), "--child", "--devices=0",
          f"--batch_sizes={','.join(FLAGS.batch_sizes)}", f"--repeats={FLAGS.repeats}", f"--model={FLAGS.model}",
          f"--maxiter={FLAGS.maxiter}", f"--num_bisection={FLAGS.num_bisection}"]
  for name in ("workdir", "run_dir", "data_dir"):
    if getattr(FLAGS, name):
      argv.append(f"--{name}={getattr(FLAGS, name)}")
  t0 = time.perf_counter()
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"child with {d} devices failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
  rows = [json.loads(line[len("ROW "):]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
  logging.info("%d devices: %.0fs", d, time.perf_counter() - t0)
  return rows


def _full():
  """Attacks every training image once with the streamed, sharded, resumable attack."""
  import jax  # pylint: disable=g-import-not-at-top
  from intriguing_jax import attack, data, distributed, progress  # pylint: disable=g-import-not-at-top
  if not FLAGS.workdir:
    raise app.UsageError("--mode=full needs --workdir (models and the resumable attack stream go there)")
  distributed.initialize()
  progress.log_run_start(FLAGS.workdir, FLAGS)
  model, variables = _model()
  x, y = data.load_mnist("train", FLAGS.data_dir)
  if FLAGS.num_examples:
    x, y = x[:FLAGS.num_examples], y[:FLAGS.num_examples]
  targets = np.asarray(attack.random_targets(jax.random.PRNGKey(0), y))
  opts = _attack_options()
  chunk = FLAGS.chunk_size or None
  if chunk is None:
    # Memory of one example through the attack ~ the grid of L-BFGS states: estimate it from the logits
    # function and scale by the c grid and the L-BFGS history (2 * history vectors per solve).
    per = distributed.estimate_bytes_per_example(lambda v, xb: model.apply(v, xb), x[:1], broadcast=(variables,))
    per *= len(attack.DEFAULT_C_GRID) * (2 * 10 + 4)
    chunk = distributed.pick_chunk_size(per, max_chunk_size=min(x.shape[0], FLAGS.max_chunk_size))
    logging.info("chunk size %d from %d bytes/example", chunk, per)
  fn = lambda v, xb, tb: attack.lbfgs_attack(model.apply, xb, tb, params=v, **opts)
  t0 = time.perf_counter()
  # lbfgs_attack shards each chunk over all (global) devices itself: every process passes the whole chunk.
  # The parameters go in `broadcast`, so they are part of the workdir's fingerprint (another model is refused).
  res = distributed.stream_map(fn, x, targets, broadcast=(variables,), chunk_size=chunk, jit=False,
                               split_processes=False,
                               name=f"attack-{FLAGS.model}",
                               workdir=os.path.join(FLAGS.workdir, f"attack_{FLAGS.model}_train"),
                               key=f"{FLAGS.model} {sorted(opts.items())} seed0")
  seconds = time.perf_counter() - t0
  summary = {"model": FLAGS.model, "num_examples": int(x.shape[0]), "devices": jax.device_count(),
             "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "chunk_size": chunk,
             "seconds_this_run": seconds, "success": float(np.mean(res.success)),
             "mean_distortion_success": float(np.mean(res.distortion[res.success])) if res.success.any() else None}
  print(json.dumps(summary, indent=2))
  if FLAGS.out and jax.process_index() == 0:
    from intriguing_jax import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.atomic_write_json(FLAGS.out, summary)


def main(argv):
  del argv
  batch_sizes = []
  for s in FLAGS.batch_sizes:
    if not s.isdigit() or int(s) < 1:
      raise app.UsageError(f"--batch_sizes must be positive integers, got {s!r}")
    batch_sizes.append(int(s))
  devices = []
  for s in FLAGS.devices:
    if not s.isdigit():
      raise app.UsageError(f"--devices must be non-negative integers, got {s!r}")
    devices.append(int(s))
  if 0 in devices and len(devices) > 1:
    raise app.UsageError("--devices=0 (the devices present) cannot be combined with forced counts")
  if FLAGS.mode == "full":
    return _full()
  if FLAGS.child or devices == [0]:
    rows = _child_rows()
    if FLAGS.child:
      return
  else:
    rows = []
    for d in devices:
      rows += _relaunch(d)
      if FLAGS.out:  # partial results survive an interrupted benchmark
        from intriguing_jax import checkpoint  # pylint: disable=g-import-not-at-top
        checkpoint.atomic_write_json(FLAGS.out, {"rows": rows, "argv": sys.argv, "complete": False})
  from intriguing_jax import plotting  # pylint: disable=g-import-not-at-top
  print(plotting.markdown_table(rows, ["backend", "data", "devices", "batch", "examples_per_s", "seconds_per_batch",
                                       "examples_per_cpu_s", "first_call_s", "load_avg_1m", "success",
                                       "mean_distortion"], floatfmt=".3g"))
  if FLAGS.out:
    from intriguing_jax import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.atomic_write_json(FLAGS.out, {"rows": rows, "argv": sys.argv, "complete": True})


if __name__ == "__main__":
  app.run(main)
