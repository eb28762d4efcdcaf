"""Atomic, verifiable checkpoints and result files.

Usage::

    from intriguing_jax import checkpoint
    checkpoint.save_checkpoint(workdir / "ckpt", {"params": params, "opt_state": opt}, step=100)
    state, step = checkpoint.restore_checkpoint(workdir / "ckpt", target=template)
    checkpoint.atomic_write_json(workdir / "results.json", {"error": 0.0164})

Every write goes to a temporary file in the destination directory, is flushed and fsync'ed, then moved
into place with ``os.replace`` (atomic on POSIX), so a crash mid-write never leaves a half-written file
under the final name. Checkpoint files carry a magic header and the SHA-256 of their payload, so a
truncated or corrupted file is reported as such (naming the file) instead of being half-restored.

Layout of a checkpoint directory (big_vision style)::

    ckpt_00000100.msgpack   one file per kept step
    LAST                    name of the newest complete checkpoint, replaced atomically
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any, Optional, Tuple, Union

import numpy as np
from flax import serialization

PathLike = Union[str, os.PathLike]

_MAGIC = b"IJXCKPT1"
_NAME_RE = re.compile(r"^ckpt_(\d{8,})\.msgpack$")


class CheckpointError(RuntimeError):
  """A checkpoint file is missing, truncated, corrupted or does not fit the target."""


def _fsync_dir(dirname: str) -> None:
  try:
    fd = os.open(dirname, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
  path = os.fspath(path)
  dirname = os.path.dirname(os.path.abspath(path))
  os.makedirs(dirname, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=dirname)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  _fsync_dir(dirname)


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.generic,)):
    return obj.item()
  if hasattr(obj, "__array__"):
    return np.asarray(obj).tolist()
  raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: PathLike, obj: Any, *, indent: int = 2) -> None:
  """Writes ``obj`` as JSON atomically; numpy/JAX arrays and scalars become lists/numbers."""
  text = json.dumps(obj, indent=indent, sort_keys=False, default=_json_default, allow_nan=True)
  atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def read_json(path: PathLike) -> Any:
  """Reads a JSON file, naming the file in the error if it is missing or not valid JSON."""
  path = os.fspath(path)
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"JSON file not found: {path}") from e
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def pytree_to_bytes(tree: Any) -> bytes:
  """Serialises a pytree of arrays (Flax state-dict conventions) with a checksummed header."""
  payload = serialization.msgpack_serialize(serialization.to_state_dict(tree))
  return _MAGIC + hashlib.sha256(payload).digest() + payload


def pytree_from_bytes(data: bytes, target: Any = None, *, name: str = "<bytes>") -> Any:
  """Inverse of :func:`pytree_to_bytes`. With ``target`` the structure (NamedTuples, dataclasses) is rebuilt."""
  if len(data) < len(_MAGIC) + 32 or data[: len(_MAGIC)] != _MAGIC:
    raise CheckpointError(f"{name}: not an intriguing_jax checkpoint (bad header or truncated file)")
  digest = data[len(_MAGIC): len(_MAGIC) + 32]
  payload = data[len(_MAGIC) + 32:]
  if hashlib.sha256(payload).digest() != digest:
    raise CheckpointError(f"{name}: checksum mismatch (file truncated or corrupted)")
  state = serialization.msgpack_restore(payload)
  if target is None:
    return state
  try:
    return serialization.from_state_dict(target, state)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{name}: checkpoint does not match the target structure: {e}") from e


def save_pytree(path: PathLike, tree: Any) -> None:
  """Saves one pytree to one file, atomically."""
  atomic_write_bytes(path, pytree_to_bytes(tree))


def load_pytree(path: PathLike, target: Any = None) -> Any:
  """Loads a pytree written by :func:`save_pytree`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  return pytree_from_bytes(data, target, name=path)


def _ckpt_name(step: int) -> str:
  return f"ckpt_{int(step):08d}.msgpack"


def all_steps(ckpt_dir: PathLike) -> list:
  """Steps of the complete checkpoints in ``ckpt_dir``, ascending."""
  ckpt_dir = os.fspath(ckpt_dir)
  if not os.path.isdir(ckpt_dir):
    return []
  steps = []
  for name in os.listdir(ckpt_dir):
    m = _NAME_RE.match(name)
    if m:
      steps.append(int(m.group(1)))
  return sorted(steps)


def latest_step(ckpt_dir: PathLike) -> Optional[int]:
  """The step named by ``LAST`` (or the newest checkpoint file), or None if there is none."""
  ckpt_dir = os.fspath(ckpt_dir)
  last = os.path.join(ckpt_dir, "LAST")
  if os.path.isfile(last):
    with open(last, "r", encoding="utf-8") as f:
      name = f.read().strip()
    m = _NAME_RE.match(name)
    if m and os.path.isfile(os.path.join(ckpt_dir, name)):
      return int(m.group(1))
  steps = all_steps(ckpt_dir)
  return steps[-1] if steps else None


def save_checkpoint(ckpt_dir: PathLike, tree: Any, step: int, *, keep: int = 2) -> str:
  """Saves ``tree`` as the checkpoint of ``step``, updates ``LAST``, keeps the newest ``keep`` files.

  Returns:
    The path of the written checkpoint file.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  ckpt_dir = os.fspath(ckpt_dir)
  os.makedirs(ckpt_dir, exist_ok=True)
  name = _ckpt_name(step)
  path = os.path.join(ckpt_dir, name)
  save_pytree(path, tree)
  atomic_write_bytes(os.path.join(ckpt_dir, "LAST"), (name + "\n").encode())
  for old in all_steps(ckpt_dir)[:-keep]:
    if old != int(step):
      try:
        os.unlink(os.path.join(ckpt_dir, _ckpt_name(old)))
      except FileNotFoundError:
        pass
  return path


def restore_checkpoint(ckpt_dir: PathLike, target: Any = None,
                       step: Optional[int] = None) -> Tuple[Any, Optional[int]]:
  """Restores the checkpoint of ``step`` (default: the latest).

  Returns:
    ``(tree, step)``; ``(target, None)`` when the directory holds no checkpoint.

  Raises:
    CheckpointError: the file is corrupted or does not fit ``target``.
  """
  if step is None:
    step = latest_step(ckpt_dir)
    if step is None:
      return target, None
  path = os.path.join(os.fspath(ckpt_dir), _ckpt_name(step))
  return load_pytree(path, target), int(step)


def guard_run_config(workdir: PathLike, run_info: Any, *, filename: str = "run_config.json") -> None:
  """Records ``run_info`` in ``workdir/filename``, or checks that a previous run there used the same settings.

  Resuming a run in a workdir that holds a run with other settings would silently mix two experiments, so a
  mismatch raises ``ValueError`` naming the keys that differ.
  """
  info_path = os.path.join(os.fspath(workdir), filename)
  new = json.loads(json.dumps(run_info, default=_json_default))
  if os.path.exists(info_path):
    old = read_json(info_path)
    if old != new:
      diff = sorted(k for k in new if old.get(k) != new[k])
      raise ValueError(f"{os.fspath(workdir)} holds a run with different settings ({', '.join(diff)}); "
                       "use another workdir or delete it")
  else:
    atomic_write_json(info_path, run_info)
