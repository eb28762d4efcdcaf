"""Shared pytest set-up: strict JAX numerics, the real-MNIST location, tiny synthetic data."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Catch accidental (batch x c) broadcasting bugs early.
jax.config.update("jax_numpy_rank_promotion", "raise")
# float32 matmuls everywhere: the tolerances here assume float32 arithmetic, which a CPU always uses, but a
# GPU's default is TF32 (~1e-3 relative error; several attack tests failed on an H200 with it). The attack
# sets its own precision (AttackOptions.precision), which test_attack checks under the "default" setting.
jax.config.update("jax_default_matmul_precision", "highest")

_REPO = pathlib.Path(__file__).resolve().parents[1]
_DEFAULT_MNIST = _REPO.parent / "shared" / "data" / "mnist"


def real_mnist_dir():
  """The real MNIST IDX directory ($INTRIGUING_JAX_MNIST_DIR, else ../shared/data/mnist), or None."""
  env = os.environ.get("INTRIGUING_JAX_MNIST_DIR")
  for cand in ([pathlib.Path(env)] if env else []) + [_DEFAULT_MNIST]:
    if cand.is_dir() and (cand / "t10k-labels-idx1-ubyte.gz").exists():
      return cand
  return None


@pytest.fixture(scope="session")
def mnist_dir():
  d = real_mnist_dir()
  if d is None:
    pytest.skip("real MNIST not found: set INTRIGUING_JAX_MNIST_DIR or place the IDX files in ../shared/data/mnist")
  return d


def write_synthetic_idx(directory, *, num_train: int = 512, num_test: int = 128) -> str:
  """Writes ``data.synthetic_mnist`` as the four gzipped IDX files of a local MNIST directory.

  For end-to-end tests of the scripts (``--data_dir``): the loader reads them like the real files.
  Returns ``directory``.
  """
  import gzip
  import struct

  import numpy as np

  from intriguing_jax import data

  os.makedirs(directory, exist_ok=True)
  for (img_name, lbl_name), num, seed in ((("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"), num_train, 0),
                                          (("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"), num_test, 1)):
    x, y = data.synthetic_mnist(num, seed=seed, image_shape=(28, 28))
    for name, arr in ((img_name, np.round(x * 255.0)), (lbl_name, y)):
      arr = np.asarray(arr, np.uint8)
      header = struct.pack(">i", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
      with open(os.path.join(directory, name), "wb") as f:
        f.write(gzip.compress(header + arr.tobytes(), mtime=0))
  return str(directory)


@pytest.fixture
def synthetic_idx_dir(tmp_path):
  """A local MNIST IDX directory holding tiny learnable synthetic data (512 train, 128 test images)."""
  return write_synthetic_idx(tmp_path / "synthetic_mnist")


def random_variables(model, input_shape, *, seed: int = 0, scale: float = 0.5):
  """Variables of a Flax ``model`` at its init shapes for inputs [1, *input_shape], every leaf drawn
  N(0, scale^2) by numpy: compiling ``model.init`` (threefry, Flax's initialisers) costs 1-3 s per model on
  a 2-core CPU, and the tests need only generic values."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(input_shape)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes)


def equations(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (while, cond, scan, pjit) included, in order."""
  out = []
  for eqn in jaxpr.eqns:
    out.append(eqn)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          out.extend(equations(sub))
  return out


def dot_precisions(jaxpr):
  """The precision of every dot_general in a jaxpr, sub-jaxprs included."""
  return [eqn.params["precision"] for eqn in equations(jaxpr) if eqn.primitive.name == "dot_general"]
