"""Reading and validating MNIST IDX files with numpy only (no TensorFlow, no network).

The IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header -- a 4-byte magic number whose low
byte is the number of dimensions (2051 for 3-d uint8 images, 2049 for 1-d uint8 labels), one uint32 per
dimension -- then the raw uint8 payload; files gzipped or plain. Validation is on the decoded content
(magic, dimensions, payload length, label range, image/label counts), so recompressed files are accepted;
a ``SHA256SUMS`` file in the directory is checked for the files it lists. Every problem raises a
:class:`MnistError` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from typing import Dict, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
SPLITS = ("train", "test")
# Canonical file names (as distributed by LeCun et al. and mirrored by tfds) and example counts.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CANONICAL_COUNTS = {"train": 60000, "test": 10000}
SHA256SUMS = "SHA256SUMS"

WHERE_TO_GET = (
    "Download the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (e.g. from "
    "https://storage.googleapis.com/cvdf-datasets/mnist/ or http://yann.lecun.com/exdb/mnist/) into one "
    "directory and point INTRIGUING_JAX_MNIST_DIR (or the scripts' --data_dir flag) at it.")


class MnistError(Exception):
  """Base class of every MNIST data-layer error (the message names the file and the problem)."""

  def __init__(self, path: Optional[PathLike], problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class MnistNotFoundError(MnistError, FileNotFoundError):
  """A directory or file is missing, or no data source is reachable (no local data and no network)."""

  def __str__(self):  # FileNotFoundError's __str__ would drop our message format.
    return self.args[0] if self.args else ""


class MnistFormatError(MnistError, ValueError):
  """A file is not gzip, truncated, has a wrong IDX magic/dimensions, or images and labels disagree."""


class MnistChecksumError(MnistFormatError):
  """A file's SHA-256 does not match its entry in SHA256SUMS (or the canonical checksum)."""


def resolve_file(directory: PathLike, name: str) -> str:
  """Path of ``name`` in ``directory``, else of its uncompressed variant (MnistNotFoundError if neither)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise MnistNotFoundError(directory, f"MNIST directory does not exist or is not a directory. "
                             f"{WHERE_TO_GET}")
  path = os.path.join(directory, name)
  if os.path.isfile(path):
    return path
  if name.endswith(".gz") and os.path.isfile(path[:-3]):
    return path[:-3]
  raise MnistNotFoundError(path, f"MNIST file is missing (nor is an uncompressed "
                           f"{os.path.basename(path[:-3])!r} there). {WHERE_TO_GET}")


def _read_bytes(path: str) -> bytes:
  """The decompressed content of ``path`` (gzip if it starts with the gzip magic or ends in .gz)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise MnistNotFoundError(path, f"cannot read file: {e}") from e
  if raw[:2] == b"\x1f\x8b":
    try:
      return gzip.decompress(raw)
    except EOFError as e:
      raise MnistFormatError(path, f"truncated gzip file ({len(raw)} bytes): {e}") from e
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
      raise MnistFormatError(path, f"corrupt gzip file ({len(raw)} bytes): {e}") from e
  if path.endswith(".gz"):
    raise MnistFormatError(path, f"not a gzip file (first bytes {raw[:4]!r}, expected b'\\x1f\\x8b')")
  return raw


def parse_idx(data: bytes, path: str, expected_magic: int) -> np.ndarray:
  """Decompressed IDX bytes -> read-only uint8 array of the header's shape (a view on ``data``); raises
  MnistFormatError naming ``path`` on a short header, a magic other than ``expected_magic`` or a payload
  length other than the product of the dimensions."""
  if len(data) < 4:
    raise MnistFormatError(path, f"truncated IDX file: {len(data)} bytes, no room for the magic number")
  (magic,) = struct.unpack(">i", data[:4])
  if magic != expected_magic:
    kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
    raise MnistFormatError(path, f"wrong IDX magic number {magic} (expected {expected_magic} for {kind})")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise MnistFormatError(path, f"truncated IDX header: {len(data)} bytes, need {header}")
  dims = struct.unpack(f">{ndim}I", data[4:header])
  expected = int(np.prod(dims, dtype=np.int64))
  got = len(data) - header
  if got != expected:
    what = "truncated" if got < expected else "trailing bytes after"
    raise MnistFormatError(path, f"{what} IDX payload: header dims {dims} need {expected} bytes, "
                           f"file has {got}")
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def verify_sha256sums(directory: PathLike, names=None) -> Dict[str, str]:
  """Checks the existing files listed in ``directory/SHA256SUMS`` (``sha256sum`` format), restricted to
  ``names`` if given; returns {file name: digest} of those verified ({} without SHA256SUMS). Raises
  MnistFormatError for a malformed line, MnistChecksumError (naming both digests) for a mismatch."""
  directory = os.fspath(directory)
  path = os.path.join(directory, SHA256SUMS)
  sums, verified = {}, {}
  if not os.path.isfile(path):
    return verified
  with open(path, "r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      parts = line.split(None, 1)
      if len(parts) != 2 or len(parts[0]) != 64:
        raise MnistFormatError(path, f"line {lineno} is not '<sha256>  <file name>': {line!r}")
      digest, name = parts
      sums[os.path.basename(name.lstrip("*"))] = digest.lower()
  for name, expected in sums.items():
    path = os.path.join(directory, name)
    if (names is not None and name not in names) or not os.path.isfile(path):
      continue
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    actual = h.hexdigest()
    if actual != expected:
      raise MnistChecksumError(path, f"SHA-256 mismatch: SHA256SUMS says {expected}, file has {actual}")
    verified[name] = actual
  return verified


def read_pair(img_path: PathLike, lbl_path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N] in [0, 10)) of an IDX3 image and an IDX1 label file
  (MnistFormatError naming the file on another shape, a label out of range or disagreeing counts)."""
  img_path, lbl_path = os.fspath(img_path), os.fspath(lbl_path)
  images = parse_idx(_read_bytes(img_path), img_path, IMAGES_MAGIC)
  if images.ndim != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE:
    raise MnistFormatError(img_path, f"images have shape {images.shape}, expected (N, 28, 28)")
  labels = parse_idx(_read_bytes(lbl_path), lbl_path, LABELS_MAGIC)
  if labels.ndim != 1:
    raise MnistFormatError(lbl_path, f"labels have shape {labels.shape}, expected (N,)")
  if labels.size and int(labels.max()) >= NUM_CLASSES:
    raise MnistFormatError(lbl_path, f"label value {int(labels.max())} out of range [0, {NUM_CLASSES})")
  if images.shape[0] != labels.shape[0]:
    raise MnistFormatError(img_path, f"image/label count mismatch: {images.shape[0]} images in {img_path} "
                           f"but {labels.shape[0]} labels in {lbl_path}")
  return images, labels


def read_split(directory: PathLike, split: str, *, verify: bool = True) -> Tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N]) of ``split`` ("train" | "test") in an IDX directory,
  checked against ``SHA256SUMS`` first when ``verify`` and that file is present."""
  if split not in FILES:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  img_path, lbl_path = (resolve_file(directory, name) for name in FILES[split])
  if verify:
    verify_sha256sums(directory, names={os.path.basename(img_path), os.path.basename(lbl_path)})
  return read_pair(img_path, lbl_path)
