"""A TensorFlow-free tensorflow-datasets builder for MNIST (array_record files, ``tfds.data_source``).

Usage::

    from intriguing_jax import mnist_tfds
    images, labels = mnist_tfds.load("test")                     # builds on first use (download), then reads
    builder = mnist_tfds.build(data_dir="/tmp/tfds", manual_dir="/path/to/idx")   # offline build
    source = tfds.data_source("intriguing_jax_mnist", split="test", data_dir="/tmp/tfds")  # once built

tfds' own ``mnist`` stores PNG-encoded images in TFRecords read through ``tf.data`` (TensorFlow); this
builder stores raw ``uint8 [28, 28, 1]`` tensors in ``array_record`` files, written by tfds' pure-Python
writer and read by ``tfds.data_source``: no TensorFlow, no Beam. The IDX files come from ``manual_dir``
(default ``$INTRIGUING_JAX_MNIST_DIR``; validated as in :mod:`intriguing_jax._idx`), else are downloaded
by tfds with the size and SHA-256 of :data:`CANONICAL`. Offline with no manual dir, :func:`load` fails
within ``connect_timeout`` seconds with a ``MnistNotFoundError`` saying what to set; it never hangs.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import socket
from typing import Optional, Tuple, Union

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums

from intriguing_jax import _idx
from intriguing_jax._idx import MnistNotFoundError

PathLike = Union[str, os.PathLike]

NAME = "intriguing_jax_mnist"
URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# (size in bytes, SHA-256) of the canonical archives, as tfds registers them for its own mnist builder.
CANONICAL = {
    "train-images-idx3-ubyte.gz":
        (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz":
        (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
URL_INFOS = {
    URL + name: tfds_checksums.UrlInfo(size=size, checksum=sha, filename=name)
    for name, (size, sha) in CANONICAL.items()
}
FILE_FORMAT = "array_record"
ENV_VAR = "INTRIGUING_JAX_MNIST_DIR"


class IntriguingJaxMnist(tfds.core.GeneratorBasedBuilder):
  """MNIST as raw uint8 tensors in array_record files; buildable and readable without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Raw uint8 [28,28,1] images, int64 class labels, array_record."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional (offline builds): place train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
      "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or plain) in the manual dir. "
      "Without them the canonical files are downloaded from " + URL)

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):  # Registered checksums without a checksums.tsv file next to this module.
    return dict(URL_INFOS)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="The MNIST database of handwritten digits (raw uint8 pixels, no image codec).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=_idx.NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        # Keep the canonical IDX order (tfds would otherwise shuffle by key hash): P1/P2 = first/last half.
        disable_shuffling=True,
        homepage="http://yann.lecun.com/exdb/mnist/",
    )

  def _split_generators(self, dl_manager):
    manual = _manual_dir_with_files(dl_manager)
    if manual is not None:
      logging.info("Building %s offline from the IDX files in %s.", NAME, manual)
      _idx.verify_sha256sums(manual)
      paths = {name: _idx.resolve_file(manual, name) for name in CANONICAL}
    else:
      logging.info("Downloading the MNIST IDX files from %s.", URL)
      paths = dl_manager.download({name: URL + name for name in CANONICAL})
    return {
        split: self._generate_examples(os.fspath(paths[img]), os.fspath(paths[lbl]))
        for split, (img, lbl) in _idx.FILES.items()
    }

  def _generate_examples(self, images_path: str, labels_path: str):
    images, labels = _idx.read_pair(images_path, labels_path)
    for i in range(images.shape[0]):
      yield i, {"image": images[i, :, :, None], "label": int(labels[i])}


def _manual_dir_with_files(dl_manager) -> Optional[str]:
  """The manual dir if one was given and exists, else None (then the files are downloaded)."""
  try:
    manual = dl_manager.manual_dir  # Raises AssertionError when the configured dir does not exist.
  except AssertionError:
    return None
  if manual is None or not os.path.isdir(os.fspath(manual)):
    return None
  return os.fspath(manual)


def network_reachable(host: str = "storage.googleapis.com", port: int = 443, timeout: float = 3.0) -> bool:
  """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds, DNS included (the check
  runs in a thread abandoned after ``timeout``: DNS lookups have no timeout of their own)."""
  def _connect():
    with socket.create_connection((host, port), timeout=timeout):
      return True

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  try:
    return bool(pool.submit(_connect).result(timeout=timeout))
  except Exception:  # pylint: disable=broad-except  (timeout, DNS failure, refused, unreachable)
    return False
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


def _builder(data_dir: Optional[PathLike]) -> IntriguingJaxMnist:
  return IntriguingJaxMnist(data_dir=data_dir and os.fspath(data_dir), file_format=FILE_FORMAT)


def build(data_dir: Optional[PathLike] = None, *, manual_dir: Optional[PathLike] = None,
          download: bool = True, connect_timeout: float = 3.0) -> IntriguingJaxMnist:
  """Prepares the dataset in ``data_dir`` (None: tfds default) unless built; returns the builder.

  From ``manual_dir`` (None: ``$INTRIGUING_JAX_MNIST_DIR`` if set), else by download when ``download`` and
  the host answers within ``connect_timeout`` seconds. Raises MnistNotFoundError (missing manual dir, or
  nothing to build from: the message says what to set), MnistFormatError or MnistChecksumError.
  """
  builder = _builder(data_dir)
  if builder.is_prepared():
    return builder
  if manual_dir is None:
    manual_dir = os.environ.get(ENV_VAR) or None
  if manual_dir is not None:
    manual_dir = os.fspath(manual_dir)
    if not os.path.isdir(manual_dir):
      raise MnistNotFoundError(manual_dir, f"manual_dir does not exist or is not a directory. "
                               f"{_idx.WHERE_TO_GET}")
    for name in CANONICAL:  # Fail on missing files before tfds creates anything.
      _idx.resolve_file(manual_dir, name)
  else:
    where = f"{NAME} is not built in {builder.data_dir}"
    if not download:
      raise MnistNotFoundError(None, f"{where} and download=False. {_idx.WHERE_TO_GET}")
    host = URL.split("/")[2]
    if not network_reachable(host, 443, connect_timeout):
      raise MnistNotFoundError(None, f"{where} and {host} is unreachable within {connect_timeout:g} s "
                               f"(no network?). {_idx.WHERE_TO_GET}")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  builder.download_and_prepare(download_config=config)
  return builder


@functools.lru_cache(maxsize=4)
def _load_cached(split: str, data_root: str, fingerprint) -> Tuple[np.ndarray, np.ndarray]:
  del fingerprint  # Cache key only.
  source = tfds.data_source(NAME, split=split, data_dir=data_root, download=False)
  n, step = len(source), 4096
  images, labels = np.empty((n, 28, 28, 1), np.float32), np.empty((n,), np.int32)
  for start in range(0, n, step):
    batch = source.__getitems__(range(start, min(n, start + step)))
    images[start:start + len(batch)] = np.stack([ex["image"] for ex in batch]) * np.float32(1.0 / 255.0)
    labels[start:start + len(batch)] = [ex["label"] for ex in batch]
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load(split: str, data_dir: Optional[PathLike] = None, *, manual_dir: Optional[PathLike] = None,
         download: bool = True, connect_timeout: float = 3.0) -> Tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, 28, 28, 1] in [0, 1], labels int32 [N]) of ``split`` through the builder (built
  first if needed, :func:`build`), read-only and cached in-process."""
  if split not in _idx.SPLITS:
    raise ValueError(f"split must be one of {_idx.SPLITS}, got {split!r}")
  builder = build(data_dir, manual_dir=manual_dir, download=download, connect_timeout=connect_timeout)
  info_file = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
  try:
    fingerprint = os.stat(info_file).st_mtime_ns
  except OSError:
    fingerprint = None
  return _load_cached(split, os.fspath(builder.data_dir_root), fingerprint)
