"""Shared pytest set-up: strict JAX numerics, the real-MNIST location, tiny synthetic data."""

import os
import pathlib

import jax
import pytest

# Catch accidental (batch x c) broadcasting bugs early.
jax.config.update("jax_numpy_rank_promotion", "raise")

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
