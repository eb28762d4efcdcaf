"""Tests of intriguing_jax.data / _idx / mnist_tfds: IDX parsing, errors, splits, tfds, real MNIST."""

import gzip
import hashlib
import os
import struct

import numpy as np
import pytest

from intriguing_jax import _idx
from intriguing_jax import data

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_COUNTS = {"train": 12, "test": 6}


def _idx_bytes(arr, magic=None):
  arr = np.asarray(arr, np.uint8)
  if magic is None:
    magic = 0x0800 | arr.ndim
  return struct.pack(">i", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write(path, payload, *, gz=True, level=9):
  with open(path, "wb") as f:
    f.write(gzip.compress(payload, compresslevel=level, mtime=0) if gz else payload)


def _arrays(split):
  rng = np.random.default_rng({"train": 1, "test": 2}[split])
  n = _COUNTS[split]
  images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  images[0, 0, 0], images[0, 0, 1] = 0, 255
  labels = (np.arange(n) % 10).astype(np.uint8)
  return images, labels


def _make_dir(directory, *, sums=True):
  os.makedirs(directory, exist_ok=True)
  lines = []
  for split, (img_name, lbl_name) in _FILES.items():
    images, labels = _arrays(split)
    _write(os.path.join(directory, img_name), _idx_bytes(images))
    _write(os.path.join(directory, lbl_name), _idx_bytes(labels))
    for name in (img_name, lbl_name):
      with open(os.path.join(directory, name), "rb") as f:
        lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {name}\n")
  if sums:
    with open(os.path.join(directory, "SHA256SUMS"), "w") as f:
      f.writelines(lines)
  return directory


@pytest.fixture
def idx_dir(tmp_path):
  return _make_dir(str(tmp_path / "mnist"))


# ----------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_synthetic_idx_roundtrip(idx_dir, split):
  images, labels = data.load_mnist(split, idx_dir)
  want_images, want_labels = _arrays(split)
  assert images.shape == (_COUNTS[split], 28, 28, 1) and images.dtype == np.float32
  assert labels.shape == (_COUNTS[split],) and labels.dtype == np.int32
  np.testing.assert_allclose(images[..., 0], want_images / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(labels, want_labels)
  assert images.min() == 0.0 and images.max() == 1.0


def test_uncompressed_files_and_no_sha256sums_are_accepted(tmp_path):
  d = _make_dir(str(tmp_path / "m"), sums=False)
  images, labels = _arrays("test")
  name = _FILES["test"][0]
  os.remove(os.path.join(d, name))
  _write(os.path.join(d, name[:-3]), _idx_bytes(images), gz=False)
  x, y = data.load_mnist("test", d)
  np.testing.assert_array_equal(np.round(x[..., 0] * 255).astype(np.uint8), images)
  np.testing.assert_array_equal(y, labels)


def test_recompressed_file_accepted_when_sha256sums_matches(idx_dir):
  # Same decoded content, different gzip bytes (as with the shared training-images file).
  name = _FILES["train"][0]
  path = os.path.join(idx_dir, name)
  before = open(path, "rb").read()
  _write(path, _idx_bytes(_arrays("train")[0]), level=1)
  after = open(path, "rb").read()
  assert before != after and gzip.decompress(before) == gzip.decompress(after)
  sums = open(os.path.join(idx_dir, "SHA256SUMS")).read().replace(
      hashlib.sha256(before).hexdigest(), hashlib.sha256(after).hexdigest())
  with open(os.path.join(idx_dir, "SHA256SUMS"), "w") as f:
    f.write(sums)
  x, _ = data.load_mnist("train", idx_dir)
  assert x.shape == (_COUNTS["train"], 28, 28, 1)
  assert set(_idx.verify_sha256sums(idx_dir)) == {n for pair in _FILES.values() for n in pair}


def _corrupt(directory, case):
  """Applies one corruption; returns (expected exception type, file name the message must contain)."""
  img, lbl = (os.path.join(directory, n) for n in _FILES["test"])
  images, labels = _arrays("test")
  if case == "missing_file":
    os.remove(lbl)
    return data.MnistNotFoundError, os.path.basename(lbl)
  if case == "not_gzip":
    _write(img, b"<html>not found</html>", gz=False)
  elif case == "truncated_gzip":
    raw = open(img, "rb").read()
    _write(img, raw[: len(raw) // 2], gz=False)
  elif case == "corrupt_gzip":
    raw = bytearray(open(img, "rb").read())
    raw[-6] ^= 0xFF  # Inside the CRC32/ISIZE trailer.
    _write(img, bytes(raw), gz=False)
  elif case == "truncated_payload":
    _write(img, _idx_bytes(images)[:-100])
  elif case == "trailing_bytes":
    _write(img, _idx_bytes(images) + b"\0" * 7)
  elif case == "short_header":
    _write(img, b"\x00\x00")
  elif case == "wrong_magic":
    _write(img, _idx_bytes(labels))  # A label file under the image name: magic 2049, not 2051.
  elif case == "wrong_dims":
    _write(img, _idx_bytes(images[:, :, :27]))
  elif case == "label_range":
    _write(lbl, _idx_bytes(np.full_like(labels, 10)))
    return data.MnistFormatError, os.path.basename(lbl)
  elif case == "count_mismatch":
    _write(lbl, _idx_bytes(labels[:-1]))
    return data.MnistFormatError, os.path.basename(lbl)  # The message names both files.
  else:
    raise AssertionError(case)
  return data.MnistFormatError, os.path.basename(img)


_CASES = ["missing_file", "not_gzip", "truncated_gzip", "corrupt_gzip", "truncated_payload", "trailing_bytes",
          "short_header", "wrong_magic", "wrong_dims", "label_range", "count_mismatch"]


@pytest.mark.parametrize("case", _CASES)
def test_bad_files_raise_named_errors(tmp_path, case):
  d = _make_dir(str(tmp_path / "m"), sums=False)  # Content checks only (no SHA256SUMS to trip first).
  err, name = _corrupt(d, case)
  with pytest.raises(err) as info:
    data.load_mnist("test", d)
  assert name in str(info.value), str(info.value)
  assert isinstance(info.value, data.MnistError)
  base = FileNotFoundError if err is data.MnistNotFoundError else ValueError
  assert isinstance(info.value, base)


@pytest.mark.parametrize("case", ["not_gzip", "wrong_magic", "count_mismatch"])
def test_bad_files_caught_by_sha256sums_first(idx_dir, case):
  _, name = _corrupt(idx_dir, case)
  with pytest.raises(data.MnistChecksumError, match="SHA-256 mismatch") as info:
    data.load_mnist("test", idx_dir)
  assert name in str(info.value)
  # verify=False skips SHA256SUMS but the content checks still catch the file.
  with pytest.raises(data.MnistFormatError) as info:
    data.load_mnist("test", idx_dir, verify=False)
  assert not isinstance(info.value, data.MnistChecksumError) and name in str(info.value)


def test_malformed_sha256sums(idx_dir):
  with open(os.path.join(idx_dir, "SHA256SUMS"), "a") as f:
    f.write("nonsense\n")
  with pytest.raises(data.MnistFormatError, match="SHA256SUMS"):
    data.load_mnist("test", idx_dir)


def test_missing_directory(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope.*INTRIGUING_JAX_MNIST_DIR"):
    data.load_mnist("train", missing)


def test_bad_split(idx_dir):
  with pytest.raises(ValueError, match="split"):
    data.load_mnist("validation", idx_dir)


def test_cache_hit_readonly_and_invalidated_on_change(idx_dir):
  x1, y1 = data.load_mnist("test", idx_dir, verify=False)
  x2, y2 = data.load_mnist("test", idx_dir, verify=False)
  assert x1 is x2 and y1 is y2
  assert not x1.flags.writeable and not y1.flags.writeable
  labels = _arrays("test")[1]
  path = os.path.join(idx_dir, _FILES["test"][1])
  st = os.stat(path)
  _write(path, _idx_bytes((labels + 1) % 10))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # Robust to coarse mtimes.
  _, y3 = data.load_mnist("test", idx_dir, verify=False)  # File changed (size/mtime): re-read.
  np.testing.assert_array_equal(y3, (labels + 1) % 10)


def test_env_var(idx_dir, monkeypatch):
  monkeypatch.setenv(data.ENV_VAR, idx_dir)
  _, y = data.load_mnist("test")
  np.testing.assert_array_equal(y, _arrays("test")[1])
  monkeypatch.setenv(data.ENV_VAR, idx_dir + "_missing")
  with pytest.raises(data.MnistNotFoundError, match=data.ENV_VAR):
    data.load_mnist("test")
  _, y = data.load_mnist("test", idx_dir)   # the data_dir argument (a script's --data_dir) comes first
  np.testing.assert_array_equal(y, _arrays("test")[1])


# ---------------------------------------------------------------------------------------------- tfds path


def test_tfds_builder_offline_roundtrip(idx_dir, tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  from intriguing_jax import mnist_tfds
  monkeypatch.setattr(mnist_tfds, "network_reachable", lambda *a, **k: pytest.fail("network used"))
  tfds_dir = str(tmp_path / "tfds")
  mnist_tfds.build(tfds_dir, manual_dir=idx_dir)
  assert mnist_tfds.IntriguingJaxMnist(data_dir=tfds_dir, file_format=mnist_tfds.FILE_FORMAT).is_prepared()
  assert any(f.endswith(".array_record-00000-of-00001") for _, _, fs in os.walk(tfds_dir) for f in fs)
  for split in ("train", "test"):
    x, y = mnist_tfds.load(split, tfds_dir)
    want_x, want_y = data.load_mnist(split, idx_dir)
    np.testing.assert_array_equal(x, want_x)  # Same values AND canonical order (shuffling disabled).
    np.testing.assert_array_equal(y, want_y)
  source = tfds.data_source(mnist_tfds.NAME, split="test", data_dir=tfds_dir, download=False)
  assert len(source) == _COUNTS["test"]
  np.testing.assert_array_equal(source[3]["image"][..., 0], _arrays("test")[0][3])
  # load_mnist(data_dir=None) without the env var goes through the (already built) tfds dataset.
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  _, y = data.load_mnist("test", tfds_data_dir=tfds_dir, download=False)
  np.testing.assert_array_equal(y, _arrays("test")[1])


def test_tfds_builder_uses_env_var_as_manual_dir(idx_dir, tmp_path, monkeypatch):
  from intriguing_jax import mnist_tfds
  monkeypatch.setattr(mnist_tfds, "network_reachable", lambda *a, **k: pytest.fail("network used"))
  monkeypatch.setenv(data.ENV_VAR, idx_dir)
  _, y = mnist_tfds.load("train", str(tmp_path / "tfds"))
  np.testing.assert_array_equal(y, _arrays("train")[1])


def test_tfds_builder_rejects_bad_manual_files(idx_dir, tmp_path, monkeypatch):
  from intriguing_jax import mnist_tfds
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  _corrupt(idx_dir, "wrong_magic")
  with pytest.raises(data.MnistChecksumError, match=_FILES["test"][0]):
    mnist_tfds.build(str(tmp_path / "tfds"), manual_dir=idx_dir)
  os.remove(os.path.join(idx_dir, "SHA256SUMS"))
  with pytest.raises(data.MnistFormatError, match="magic"):
    mnist_tfds.build(str(tmp_path / "tfds"), manual_dir=idx_dir)
  with pytest.raises(data.MnistNotFoundError, match="manual_dir"):
    mnist_tfds.build(str(tmp_path / "tfds"), manual_dir=str(tmp_path / "none"))


def test_no_local_data_no_network_fails_with_instructions(tmp_path, monkeypatch):
  from intriguing_jax import mnist_tfds
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  monkeypatch.setattr(mnist_tfds, "network_reachable", lambda *a, **k: False)
  with pytest.raises(data.MnistNotFoundError) as info:
    data.load_mnist("test", tfds_data_dir=str(tmp_path / "tfds"))
  msg = str(info.value)
  assert "unreachable" in msg and data.ENV_VAR in msg and "--data_dir" in msg and "cvdf-datasets" in msg
  with pytest.raises(data.MnistNotFoundError, match="download=False"):
    data.load_mnist("test", tfds_data_dir=str(tmp_path / "tfds"), download=False)
  assert not os.path.exists(tmp_path / "tfds" / mnist_tfds.NAME / "1.0.0" / "dataset_info.json")


def test_network_reachable_returns_false_for_unresolvable_host():
  from intriguing_jax import mnist_tfds
  assert mnist_tfds.network_reachable("mnist.invalid", 443, timeout=2.0) is False


# ------------------------------------------------------------------------------------------------ splits


def test_p1_p2_disjoint_covering_deterministic():
  idx = lambda **kw: [y for _, y in data.split_p1_p2(np.zeros((60000, 1)), np.arange(60000), **kw)]
  a1, a2 = idx()
  np.testing.assert_array_equal(a1, np.arange(30000))
  np.testing.assert_array_equal(a2, np.arange(30000, 60000))
  s1, s2 = idx(seed=3)
  assert s1.shape == s2.shape == (30000,)
  assert np.intersect1d(s1, s2).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([s1, s2])), np.arange(60000))
  r1, _ = idx(seed=3)
  np.testing.assert_array_equal(s1, r1)
  o1, _ = idx(seed=4)
  assert not np.array_equal(s1, o1)


@pytest.mark.parametrize("seed", [None, 0])
def test_split_p1_p2_arrays(seed):
  n = 100
  images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
  labels = np.arange(n, dtype=np.int32)
  (x1, y1), (x2, y2) = data.split_p1_p2(images, labels, seed=seed)
  assert x1.shape == x2.shape == (50, 2, 2, 1)
  np.testing.assert_array_equal(x1[:, 0, 0, 0], y1)  # Images stay paired with their labels.
  np.testing.assert_array_equal(x2[:, 0, 0, 0], y2)
  assert np.intersect1d(y1, y2).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([y1, y2])), labels)
  if seed is None:
    np.testing.assert_array_equal(y1, np.arange(50))
  (_, z1), _ = data.split_p1_p2(images, labels, seed=seed)
  np.testing.assert_array_equal(y1, z1)
  with pytest.raises(ValueError, match="disagree"):
    data.split_p1_p2(images, labels[:-1])
  with pytest.raises(ValueError, match="labels must be integers"):
    data.split_p1_p2(images, labels + 0.5)


def test_train_val_split():
  n = 50
  images = np.arange(n, dtype=np.float32)[:, None]
  labels = np.arange(n, dtype=np.int32)
  (xt, yt), (xv, yv) = data.train_val_split(images, labels, num_val=10, seed=1)
  assert yt.shape == (40,) and yv.shape == (10,)
  np.testing.assert_array_equal(xt[:, 0], yt)
  np.testing.assert_array_equal(xv[:, 0], yv)
  np.testing.assert_array_equal(np.sort(np.concatenate([yt, yv])), labels)
  (_, _), (_, yv2) = data.train_val_split(images, labels, num_val=10, seed=1)
  np.testing.assert_array_equal(yv, yv2)
  (_, _), (_, yv3) = data.train_val_split(images, labels, num_val=10, seed=2)
  assert not np.array_equal(yv, yv3)
  (_, _), (_, ylast) = data.train_val_split(images, labels, num_val=10, seed=None)
  np.testing.assert_array_equal(ylast, np.arange(40, 50))
  for bad in (0, n, -1, 3.5):   # 3.5: was a TypeError from slicing
    with pytest.raises(ValueError, match="num_val"):
      data.train_val_split(images, labels, num_val=bad, seed=0)


def test_synthetic_mnist_deterministic_balanced_learnable():
  x, y = data.synthetic_mnist(200, seed=0)
  assert x.shape == (200, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
  assert 0.0 <= x.min() and x.max() <= 1.0
  np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 20))
  x2, y2 = data.synthetic_mnist(200, seed=0)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  xt, yt = data.synthetic_mnist(100, seed=1)
  assert not np.array_equal(x[:100], xt)
  # Learnable: nearest class mean (fit on seed 0) classifies seed-1 samples almost perfectly.
  means = np.stack([x[y == c].reshape(-1, 784).mean(0) for c in range(10)])
  d = ((xt.reshape(-1, 1, 784) - means[None]) ** 2).sum(-1)
  assert (d.argmin(1) == yt).mean() > 0.95
  xf, yf = data.synthetic_mnist(30, seed=0, num_classes=3, image_shape=(784,))
  assert xf.shape == (30, 784) and set(np.unique(yf)) == {0, 1, 2}
  with pytest.raises(ValueError, match="num"):
    data.synthetic_mnist(0)


# --------------------------------------------------------------------------------------------- real MNIST

# Canonical MNIST label counts (LeCun et al.; e.g. tfds' mnist statistics).
_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.integration
@pytest.mark.slow
def test_real_mnist(mnist_dir):
  if os.path.isfile(os.path.join(mnist_dir, "SHA256SUMS")):
    verified = _idx.verify_sha256sums(mnist_dir)
    assert set(verified) == {n for pair in _FILES.values() for n in pair}
  for split, n, hist in (("train", 60000, _TRAIN_HIST), ("test", 10000, _TEST_HIST)):
    x, y = data.load_mnist(split, mnist_dir)
    assert x.shape == (n, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(np.bincount(y, minlength=10), hist)
    assert 0.12 < float(x.mean()) < 0.14  # MNIST mean intensity is ~0.13.
  (x1, _), (x2, _) = data.split_p1_p2(*data.load_mnist("train", mnist_dir))
  assert x1.shape[0] == x2.shape[0] == 30000
