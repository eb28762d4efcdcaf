r"""Loads MNIST and prints a summary: shapes, label histogram, pixel statistics, load times.

Command (offline, from the IDX files; ~4 s on 2 cores)::

    python scripts/mnist_summary.py --data_dir=../shared/data/mnist

Expected result: ``train: images (60000, 28, 28, 1) float32, labels (60000,) int32``, test label
histogram ``0:980 1:1135 2:1032 3:1010 4:982 5:892 6:958 7:1028 8:974 9:1009``, pixels in [0, 1] with mean
0.1307 (train) and 0.1325 (test), P1/P2 30000/30000, and the cold and cached load times of each split.

Without ``--data_dir`` the data come from ``$INTRIGUING_JAX_MNIST_DIR``, else from the tfds builder
(``intriguing_jax.mnist_tfds``: downloads the canonical files on a connected machine -- or, offline,
fails within seconds saying what to set). ``--config.tfds_manual_dir`` builds the tfds dataset offline from
local IDX files instead (first run ~10-30 s, then the array_record files are reused; same arrays)::

    python scripts/mnist_summary.py --config.tfds_data_dir=/tmp/tfds \
        --config.tfds_manual_dir=../shared/data/mnist

Fields (``--config.split=train|test|all``, ...): ``intriguing_jax/configs/mnist_summary.py``.
"""

import sys
import time

from absl import app
import numpy as np

from intriguing_jax import cli
from intriguing_jax import data

FLAGS = cli.define_flags(
    "mnist_summary", workdir_required=False, workdir_help="Unused (the summary is printed).")


def _load(split, c):
  if c.tfds_manual_dir:
    from intriguing_jax import mnist_tfds  # pylint: disable=g-import-not-at-top
    return mnist_tfds.load(split, c.tfds_data_dir or None, manual_dir=c.tfds_manual_dir)
  return data.load_mnist(split, FLAGS.data_dir.value, tfds_data_dir=c.tfds_data_dir or None)


def _summarize(split, c):
  t0 = time.perf_counter()
  images, labels = _load(split, c)
  cold, t0 = time.perf_counter() - t0, time.perf_counter()
  _load(split, c)
  warm = time.perf_counter() - t0
  hist = np.bincount(labels, minlength=data.NUM_CLASSES)
  print(f"{split}: images {images.shape} {images.dtype}, labels {labels.shape} {labels.dtype}")
  print(f"  load time: {cold:.3f} s (first call), {warm * 1e3:.1f} ms (cached)")
  print("  label histogram: " + " ".join(f"{c}:{n}" for c, n in enumerate(hist)))
  print(f"  pixels: min {images.min():.3f} max {images.max():.3f} mean {images.mean():.4f} "
        f"std {images.std():.4f} zero fraction {np.mean(images == 0):.3f}")
  if split == "train":
    (x1, _), (x2, _) = data.split_p1_p2(images, labels)
    print(f"  P1/P2 (first/last half): {x1.shape[0]}/{x2.shape[0]}")


def main(argv):
  cli.check_no_args(argv)
  c = FLAGS.config.value
  if c.split not in ("train", "test", "all"):
    raise app.UsageError(f"--config.split must be train, test or all, got {c.split!r}")
  if FLAGS.data_dir.value is not None and c.tfds_manual_dir:
    raise app.UsageError("--data_dir (IDX files, read directly) and --config.tfds_manual_dir (build tfds "
                         "from IDX files) are exclusive.")
  source = FLAGS.data_dir.value or f"${data.ENV_VAR} or tfds"
  print(f"MNIST from {f'tfds (manual dir {c.tfds_manual_dir})' if c.tfds_manual_dir else source}")
  for split in ["train", "test"] if c.split == "all" else [c.split]:
    try:
      _summarize(split, c)
    except data.MnistError as e:  # Missing/invalid files or no network: the message says what to do.
      sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli.run(main)
