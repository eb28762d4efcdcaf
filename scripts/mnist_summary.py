r"""Loads MNIST and prints a summary: shapes, label histogram, pixel statistics, load times.

Command (offline, from the IDX files; ~4 s on 2 cores)::

    python scripts/mnist_summary.py --data_dir=../shared/data/mnist

Expected result: ``train: images (60000, 28, 28, 1) float32, labels (60000,) int32``, test label
histogram ``0:980 1:1135 2:1032 3:1010 4:982 5:892 6:958 7:1028 8:974 9:1009``, pixels in [0, 1] with mean
0.1307 (train) and 0.1325 (test), P1/P2 30000/30000, and the cold and cached load times of each split.

Without ``--data_dir`` the data come from ``$INTRIGUING_JAX_MNIST_DIR``, else from the tfds builder
(``intriguing_jax.mnist_tfds``: downloads the canonical files on a connected machine -- or, offline,
fails within seconds saying what to set). ``--tfds_manual_dir`` builds the tfds dataset offline from
local IDX files instead (first run ~10-30 s, then the array_record files are reused; same arrays)::

    python scripts/mnist_summary.py --tfds_data_dir=/tmp/tfds --tfds_manual_dir=../shared/data/mnist
"""

import sys
import time

from absl import app
from absl import flags
import numpy as np

from intriguing_jax import data

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, f"MNIST IDX directory (default ${data.ENV_VAR}, else the tfds builder).")
_SPLIT = flags.DEFINE_enum("split", "all", ["train", "test", "all"], "Which split(s) to summarize.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "tfds data directory (tfds path only).")
_TFDS_MANUAL_DIR = flags.DEFINE_string(
    "tfds_manual_dir", None, "Build the tfds dataset offline from the IDX files in this directory.")


def _load(split):
  if _TFDS_MANUAL_DIR.value is not None:
    from intriguing_jax import mnist_tfds  # pylint: disable=g-import-not-at-top
    return mnist_tfds.load(split, _TFDS_DATA_DIR.value, manual_dir=_TFDS_MANUAL_DIR.value)
  return data.load_mnist(split, _DATA_DIR.value, tfds_data_dir=_TFDS_DATA_DIR.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _DATA_DIR.value is not None and _TFDS_MANUAL_DIR.value is not None:
    raise app.UsageError("--data_dir (IDX files, read directly) and --tfds_manual_dir (build tfds from IDX "
                         "files) are exclusive.")
  splits = ["train", "test"] if _SPLIT.value == "all" else [_SPLIT.value]
  source = (f"tfds (manual dir {_TFDS_MANUAL_DIR.value})" if _TFDS_MANUAL_DIR.value else
            _DATA_DIR.value or f"${data.ENV_VAR} or tfds")
  print(f"MNIST from {source}")
  for split in splits:
    t0 = time.perf_counter()
    try:
      images, labels = _load(split)
    except data.MnistError as e:  # Missing/invalid files or no network: the message says what to do.
      sys.exit(f"error: {e}")
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    _load(split)
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


def _parse_flags(argv):
  """absl's parser, except that --help/-h exits 0 (absl's own help flag exits 1)."""
  if {"--help", "-h", "-?", "--helpshort"} & set(argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True)
    sys.exit(0)
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
