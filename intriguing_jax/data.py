"""MNIST for the experiments: loading (offline IDX or tfds), P1/P2 and validation splits, synthetic data.

Usage::

    from intriguing_jax import data
    x_train, y_train = data.load_mnist("train")            # float32 [60000,28,28,1] in [0,1], int32 [60000]
    x_test, y_test = data.load_mnist("test", data_dir="/path/to/idx")   # the four *-ubyte.gz files
    (x1, y1), (x2, y2) = data.split_p1_p2(x_train, y_train)            # paper's P1/P2: 30000 + 30000
    (xt, yt), (xv, yv) = data.train_val_split(x_train, y_train, num_val=5000, seed=0)
    xs, ys = data.synthetic_mnist(256, seed=0)                          # tiny learnable data for tests

``load_mnist`` reads, in order: ``data_dir`` (a directory of the four IDX files, gzipped or plain, validated
on their decoded content and against its ``SHA256SUMS`` if present; never the network), else
``$INTRIGUING_JAX_MNIST_DIR``, else the tfds builder :mod:`intriguing_jax.mnist_tfds` (downloads on first
use, or fails within seconds saying what to set). Decoded arrays are cached in-process (keyed on the
files' path, size and mtime) and returned read-only. Errors derive from :class:`MnistError` and name the
file: :class:`MnistNotFoundError` (a ``FileNotFoundError``), :class:`MnistFormatError` (a ``ValueError``),
:class:`MnistChecksumError`.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np

from intriguing_jax import _idx
from intriguing_jax._idx import (MnistChecksumError, MnistError, MnistFormatError,  # noqa: F401 (re-export)
                                 MnistNotFoundError)

PathLike = Union[str, os.PathLike]
ENV_VAR = "INTRIGUING_JAX_MNIST_DIR"
SPLITS = _idx.SPLITS
NUM_CLASSES = _idx.NUM_CLASSES
IMAGE_SHAPE = (28, 28, 1)

ArrayPair = Tuple[np.ndarray, np.ndarray]


def _to_float(images_u8: np.ndarray) -> np.ndarray:
  """uint8 [N,28,28] -> float32 [N,28,28,1] in [0,1]."""
  out = np.empty(images_u8.shape + (1,), np.float32)
  np.multiply(images_u8[..., None], np.float32(1.0 / 255.0), out=out, dtype=np.float32)
  return out


def _file_key(directory: str, split: str):
  """(name, size, mtime_ns) of the files that ``_idx.read_split`` would read: the cache key."""
  key = []
  for name in _idx.FILES[split] + (_idx.SHA256SUMS,):
    path = os.path.join(directory, name)
    if not os.path.isfile(path) and name.endswith(".gz"):
      path = path[:-3]
    try:
      st = os.stat(path)
      key.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    except OSError:
      key.append((os.path.basename(path), None, None))
  return tuple(key)


@functools.lru_cache(maxsize=8)
def _load_idx_cached(directory: str, split: str, verify: bool, key) -> ArrayPair:
  del key  # Only part of the cache key: a changed file (size/mtime) is re-read.
  images, labels = _idx.read_split(directory, split, verify=verify)
  if images.shape[0] != _idx.CANONICAL_COUNTS[split]:
    logging.warning("MNIST %s split in %s has %d examples (canonical: %d).", split, directory,
                    images.shape[0], _idx.CANONICAL_COUNTS[split])
  out = _to_float(images), labels.astype(np.int32)
  for a in out:
    a.setflags(write=False)
  return out


def _load_idx(directory: PathLike, split: str, verify: bool) -> ArrayPair:
  directory = os.path.realpath(os.path.expanduser(os.fspath(directory)))
  if not os.path.isdir(directory):
    raise MnistNotFoundError(directory, f"MNIST directory does not exist or is not a directory. "
                             f"{_idx.WHERE_TO_GET}")
  return _load_idx_cached(directory, split, bool(verify), _file_key(directory, split))


def load_mnist(split: str, data_dir: Optional[PathLike] = None, *, verify: bool = True,
               tfds_data_dir: Optional[PathLike] = None, download: bool = True) -> ArrayPair:
  """MNIST ``split`` ("train": 60000, "test": 10000) as read-only (images float32 [N, 28, 28, 1] in [0, 1],
  labels int32 [N]), from ``data_dir``, ``$INTRIGUING_JAX_MNIST_DIR`` or tfds (module docstring).

  ``verify``: check ``SHA256SUMS`` when the local directory has one. ``tfds_data_dir`` (None: tfds default)
  and ``download`` (may fetch the canonical files when not built) apply to the tfds path only. Raises
  ValueError (bad split), MnistNotFoundError (the message says what to set), MnistFormatError or
  MnistChecksumError (naming the file).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if data_dir is None:
    env = os.environ.get(ENV_VAR)
    if env:
      if not os.path.isdir(os.path.expanduser(env)):
        raise MnistNotFoundError(env, f"${ENV_VAR} points to a missing directory. {_idx.WHERE_TO_GET}")
      data_dir = env
  if data_dir is not None:
    return _load_idx(data_dir, split, verify)
  from intriguing_jax import mnist_tfds  # Lazy: tfds is heavy to import.
  return mnist_tfds.load(split, data_dir=tfds_data_dir, download=download)


def _check_pair(images, labels):
  if images.ndim < 1 or labels.ndim != 1:
    raise ValueError(f"labels must be 1-d and images batched; got images {images.shape}, "
                     f"labels {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"images and labels disagree on the number of examples: {images.shape[0]} vs "
                     f"{labels.shape[0]}")


def split_p1_p2(images, labels, *, seed: Optional[int] = None) -> Tuple[ArrayPair, ArrayPair]:
  """The paper's disjoint halves ((x1, y1), (x2, y2)) of images [N, ...], labels [N] (N >= 2; paper §9 A15).

  ``seed=None``: P1 = the first N // 2 examples, P2 = the rest (MNIST train: 30000 + 30000). Otherwise the
  halves of a permutation drawn with ``np.random.default_rng(seed)``.
  """
  _check_pair(images, labels)
  num = images.shape[0]
  if num < 2:
    raise ValueError(f"num must be >= 2 to split into two halves, got {num}")
  half = num // 2
  if seed is None:  # Contiguous halves: slicing avoids a 94 MB copy on MNIST.
    return (images[:half], labels[:half]), (images[half:], labels[half:])
  idx = np.random.default_rng(seed).permutation(num)
  i1, i2 = idx[:half], idx[half:]
  return (images[i1], labels[i1]), (images[i2], labels[i2])


def train_val_split(images, labels, *, num_val: int, seed: Optional[int] = 0) -> Tuple[ArrayPair, ArrayPair]:
  """((x_train, y_train), (x_val, y_val)): ``num_val`` (0 < num_val < N) of images [N, ...], labels [N] held
  out, drawn by a permutation of ``seed`` (None: the last ``num_val``), both in their original order."""
  _check_pair(images, labels)
  n = images.shape[0]
  # (types.is_integer, inline: this module does not import jax)
  integer = isinstance(num_val, (int, np.integer)) and not isinstance(num_val, (bool, np.bool_))
  if not integer or not 0 < num_val < n:
    raise ValueError(f"num_val must be in (0, {n}) for {n} examples, got {num_val}")
  if seed is None:
    return (images[:n - num_val], labels[:n - num_val]), (images[n - num_val:], labels[n - num_val:])
  perm = np.random.default_rng(seed).permutation(n)
  tr, va = np.sort(perm[num_val:]), np.sort(perm[:num_val])
  return (images[tr], labels[tr]), (images[va], labels[va])


def synthetic_mnist(num: int, *, seed: int = 0, num_classes: int = 10,
                    image_shape: Sequence[int] = IMAGE_SHAPE) -> ArrayPair:
  """Tiny deterministic, learnable MNIST stand-in: (images float32 [num, *image_shape] in [0, 1], labels
  int32 [num], balanced). Each class has a fixed sparse prototype (independent of ``seed``, so seeds give
  samples of one distribution); an example is its prototype times a random brightness plus Gaussian noise,
  clipped to [0, 1]."""
  image_shape = tuple(int(d) for d in image_shape)
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  if not image_shape or min(image_shape) < 1:
    raise ValueError(f"image_shape must be non-empty with positive dims, got {image_shape}")
  proto_rng = np.random.default_rng(1_000_003 + num_classes)
  protos = (proto_rng.uniform(size=(num_classes,) + image_shape) < 0.25).astype(np.float32)
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num) % num_classes).astype(np.int32)
  brightness = rng.uniform(0.6, 1.0, size=(num,) + (1,) * len(image_shape)).astype(np.float32)
  noise = rng.normal(0.0, 0.1, size=(num,) + image_shape).astype(np.float32)
  images = np.clip(protos[labels] * brightness + noise, 0.0, 1.0).astype(np.float32)
  return images, labels
