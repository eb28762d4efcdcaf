"""Atomic, verifiable checkpoints and result files.

Every write goes to a temporary file in the destination directory, is fsync'ed and moved into place with
``os.replace`` (atomic on POSIX), mode ``0o666 & ~umask`` as ``open`` would give. Checkpoint files carry a
magic header and the SHA-256 of their payload, so a truncated or corrupted file is reported (naming it),
never half-restored; restoring into a ``target`` checks every leaf's shape. A checkpoint directory holds
``ckpt_<step:08d>.msgpack`` files (the newest two kept) and ``LAST``, the name of the newest complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from typing import Any, Optional, Tuple, Union

from absl import logging
from flax import serialization
import jax
import numpy as np

PathLike = Union[str, os.PathLike]

_MAGIC = b"IJXCKPT1"
_NAME_RE = re.compile(r"^ckpt_(\d{8,})\.msgpack$")


class CheckpointError(RuntimeError):
  """A checkpoint file is missing, truncated, corrupted or does not fit the target."""


class CorruptFileError(CheckpointError):
  """A checkpoint or JSON file that cannot be read back (truncated, bad header, checksum, not JSON)."""


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``), mode 0o666 & ~umask."""
  path = os.fspath(path)
  dirname = os.path.dirname(os.path.abspath(path))
  os.makedirs(dirname, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=dirname)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  with contextlib.suppress(OSError):  # make the rename durable
    dir_fd = os.open(dirname, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def _json_default(obj: Any) -> Any:
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, "__array__"):
    return np.asarray(obj).tolist()
  raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


def jsonable(obj: Any) -> Any:
  """``obj`` as it reads back from JSON (arrays and tuples as lists, numpy scalars as numbers)."""
  return json.loads(json.dumps(obj, default=_json_default))


def atomic_write_json(path: PathLike, obj: Any) -> None:
  """Writes ``obj`` as JSON atomically; numpy/JAX arrays and scalars become lists/numbers."""
  text = json.dumps(obj, indent=2, default=_json_default, allow_nan=True)
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
    raise CorruptFileError(f"{path}: not valid JSON ({e})") from e


def _shapes(tree: Any) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", np.shape(leaf))) for path, leaf in flat}


def _check_shapes(state: Any, target: Any, name: str) -> None:
  """Raises CheckpointError naming the leaves whose shapes differ (e.g. a checkpoint of another model)."""
  got, want = _shapes(state), _shapes(target)
  diff = [f"{k}: {got[k]} in the file, {want[k]} expected" for k in want if k in got and got[k] != want[k]]
  diff += [f"{k}: missing from the file" for k in want if k not in got]
  diff += [f"{k}: in the file, not expected" for k in got if k not in want]
  if diff:
    more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
    raise CheckpointError(f"{name} does not fit the target (another architecture?): "
                          f"{'; '.join(diff[:8])}{more}")


def save_pytree(path: PathLike, tree: Any) -> None:
  """Saves one pytree (Flax state-dict conventions) to one checksummed file, atomically."""
  payload = serialization.msgpack_serialize(serialization.to_state_dict(tree))
  atomic_write_bytes(path, _MAGIC + hashlib.sha256(payload).digest() + payload)


def load_pytree(path: PathLike, target: Any = None) -> Any:
  """Loads a pytree written by :func:`save_pytree`; with ``target`` its structure (NamedTuples,
  dataclasses) is rebuilt and every leaf's shape checked (``target`` may hold ``jax.ShapeDtypeStruct``s)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < len(_MAGIC) + 32 or data[: len(_MAGIC)] != _MAGIC:
    raise CorruptFileError(f"{path}: not an intriguing_jax checkpoint (bad header or truncated file)")
  payload = data[len(_MAGIC) + 32:]
  if hashlib.sha256(payload).digest() != data[len(_MAGIC): len(_MAGIC) + 32]:
    raise CorruptFileError(f"{path}: checksum mismatch (file truncated or corrupted)")
  state = serialization.msgpack_restore(payload)
  if target is None:
    return state
  _check_shapes(state, serialization.to_state_dict(target), path)
  try:
    return serialization.from_state_dict(target, state)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path}: checkpoint does not match the target structure: {e}") from e


def _ckpt_name(step: int) -> str:
  return f"ckpt_{int(step):08d}.msgpack"


def all_steps(ckpt_dir: PathLike) -> list:
  """Steps of the complete checkpoints in ``ckpt_dir``, ascending."""
  ckpt_dir = os.fspath(ckpt_dir)
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  return sorted(int(m.group(1)) for m in map(_NAME_RE.match, names) if m)


def latest_step(ckpt_dir: PathLike) -> Optional[int]:
  """The step named by ``LAST`` (or the newest checkpoint file), or None if there is none."""
  last = os.path.join(os.fspath(ckpt_dir), "LAST")
  if os.path.isfile(last):
    with open(last, "rb") as f:   # anything but a checkpoint's name: the newest file instead
      m = _NAME_RE.match(f.read().decode("utf-8", "replace").strip())
    if m and os.path.isfile(os.path.join(os.fspath(ckpt_dir), m.group(0))):
      return int(m.group(1))
  steps = all_steps(ckpt_dir)
  return steps[-1] if steps else None


def save_checkpoint(ckpt_dir: PathLike, tree: Any, step: int) -> str:
  """Saves ``tree`` as the checkpoint of ``step``, updates ``LAST``, keeps the newest two files; returns
  the path of the written file."""
  ckpt_dir = os.fspath(ckpt_dir)
  path = os.path.join(ckpt_dir, _ckpt_name(step))
  save_pytree(path, tree)
  atomic_write_bytes(os.path.join(ckpt_dir, "LAST"), (_ckpt_name(step) + "\n").encode())
  for old in all_steps(ckpt_dir)[:-2]:
    if old != int(step):
      with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(ckpt_dir, _ckpt_name(old)))
  return path


def restore_checkpoint(ckpt_dir: PathLike, target: Any = None) -> Tuple[Any, Optional[int]]:
  """``(tree, step)`` of the latest intact checkpoint (``(target, None)`` when there is none): a corrupted
  or truncated latest one is skipped with a warning and the next older one restored.

  Raises:
    CheckpointError: every file is corrupted, or one does not fit ``target``.
  """
  ckpt_dir = os.fspath(ckpt_dir)
  latest = latest_step(ckpt_dir)
  candidates = [] if latest is None else [latest] + [s for s in reversed(all_steps(ckpt_dir)) if s < latest]
  for i, s in enumerate(candidates):
    try:
      return load_pytree(os.path.join(ckpt_dir, _ckpt_name(s)), target), int(s)
    except CheckpointError as e:
      if "does not fit" in str(e):
        raise
      if i + 1 == len(candidates):
        raise CheckpointError(f"{e}; no intact checkpoint left in {ckpt_dir}: delete that directory to start "
                              "the run again from scratch") from e
      logging.warning("%s; falling back to the checkpoint of step %d", e, candidates[i + 1])
  return target, None


def check_settings(where: str, stored: dict, wanted: dict, what: str = "a run") -> None:
  """Raises ValueError naming the keys whose values differ between two settings dicts (JSON-read)."""
  diff = sorted(k for k in set(wanted) | set(stored) if stored.get(k) != wanted.get(k))
  if diff:
    raise ValueError(f"{where} holds {what} with other settings ({', '.join(diff)}); use another workdir "
                     "(or run name), or delete it")


def guard_run_config(workdir: PathLike, run_info: Any) -> None:
  """Records ``run_info`` in ``workdir/run_config.json``, or checks (:func:`check_settings`) that the run
  there used the same settings: resuming another run's workdir would silently mix two experiments."""
  info_path = os.path.join(os.fspath(workdir), "run_config.json")
  if not os.path.exists(info_path):
    atomic_write_json(info_path, run_info)
  else:
    check_settings(os.fspath(workdir), read_json(info_path), jsonable(run_info))
