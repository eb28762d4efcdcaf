"""Scale-out with JAX's own machinery: a 1-D data mesh, sharded calls, multi-host, one resumable chunked map.

Usage::

    from intriguing_jax import distributed
    distributed.initialize()   # multi-host from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    logits = distributed.stream_map(model.apply, x, broadcast=(variables,))   # sharded, memory-sized chunks
    res = distributed.stream_map(attack_fn, x, targets, broadcast=(variables,), jit=False, workdir="runs/a")

Conventions: the mesh has one axis ``"batch"``; batched arguments are sharded along axis 0, broadcast ones
(parameters) replicated. Ragged batches are padded with copies of their first row (valid inputs) and the
padding is dropped from the results, so functions must not reduce over the batch. Multi-host (SPMD): every
process calls the same functions with the same full data, transfers only its own devices' rows and gets
all output rows (``process_allgather``); only process 0 writes files (resuming across hosts needs a shared
filesystem).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from intriguing_jax import checkpoint

PyTree = Any

# Chunk size per device when the device reports no memory limit (CPU) or no estimate is given.
DEFAULT_EXAMPLES_PER_DEVICE = 1024
_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


# Processes and meshes.
def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
  """``jax.distributed.initialize`` from the arguments, else ``JAX_COORDINATOR_ADDRESS`` (host:port of
  process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; a no-op with none of them. Idempotent; call it
  before any JAX call that touches devices. Returns whether the run has more than one process; an
  incomplete or inconsistent setting raises ValueError naming the missing variable."""
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  values = [os.environ.get(var) or None if v is None else v
            for v, var in zip((coordinator_address, num_processes, process_id), _ENV)]
  try:
    address, count, pid = values[0], *(None if v is None else int(v) for v in values[1:])
  except ValueError:
    raise ValueError(f"initialize: {_ENV[1]} and {_ENV[2]} must be integers, got {values[1:]}") from None
  if all(v is None for v in values):
    return False
  if None in (address, count, pid):
    raise ValueError(f"initialize: a multi-process run needs all of {', '.join(_ENV)} (or the arguments); "
                     f"got {address!r}, {count!r}, {pid!r}")
  if not 0 <= pid < count:
    raise ValueError(f"initialize: process_id must be in [0, {count}), got {pid}")
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid)
  logging.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def data_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every global device), ordered by (process, id) so that each
  process owns a contiguous block of the batch axis."""
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
  if not devices:
    raise ValueError("data_mesh: no devices")
  return Mesh(np.asarray(devices), ("batch",))


# Padding, placement and gathering.
def _leading(tree: PyTree, where: str) -> int:
  """The common leading size of every leaf of ``tree`` (ValueError naming ``where`` otherwise)."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f"{where}: no batched arrays given")
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
  if -1 in sizes:
    raise ValueError(f"{where}: batched arguments must have a leading batch axis, got a scalar")
  if len(sizes) != 1:
    raise ValueError(f"{where}: batched arguments disagree on the batch size: {sorted(sizes)}")
  return sizes.pop()


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``n``."""
  return -(-int(n) // int(multiple)) * int(multiple)


def pad_batch(tree: PyTree, size: int) -> PyTree:
  """Pads every leaf's axis 0 to ``size`` rows with copies of its first row (leaves: non-empty arrays)."""
  def pad(a):
    a = np.asarray(a)
    if a.shape[0] > size:
      raise ValueError(f"pad_batch: {a.shape[0]} rows do not fit in {size}")
    if a.shape[0] == 0:
      raise ValueError("pad_batch: cannot pad an empty batch")
    return a if a.shape[0] == size else np.concatenate([a, np.repeat(a[:1], size - a.shape[0], axis=0)])
  return jax.tree_util.tree_map(pad, tree)


def unpad(tree: PyTree, n: int) -> PyTree:
  """The first ``n`` rows of every leaf."""
  return jax.tree_util.tree_map(lambda a: a[:n], tree)


def _put(tree: PyTree, sharding: NamedSharding) -> PyTree:
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  put = lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx, a=np.asarray(a): a[idx])
  return jax.tree_util.tree_map(put, tree)  # each process transfers only its own devices' part


def put_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host arrays (the same on every process), axis 0 a multiple of ``mesh.size`` -> rows sharded over mesh."""
  return _put(tree, NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])))


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """A pytree (parameters) placed whole on every device of ``mesh``."""
  return _put(tree, NamedSharding(mesh, PartitionSpec()))


def gather(tree: PyTree) -> PyTree:
  """Global (possibly multi-host) arrays -> full numpy arrays on every process."""
  multi = lambda a: isinstance(a, jax.Array) and not a.is_fully_addressable
  return jax.tree_util.tree_map(
      lambda a: multihost_utils.process_allgather(a, tiled=True) if multi(a) else np.asarray(a), tree)


@functools.lru_cache(maxsize=128)
def _sharded_jit(fn: Callable, mesh: Mesh, num_broadcast: int, num_batched: int) -> Callable:
  rows, rep = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])), NamedSharding(mesh, PartitionSpec())
  logging.vlog(1, "distributed: compiling %s over %d devices", getattr(fn, "__name__", fn), mesh.size)
  return jax.jit(lambda *args: fn(*args), in_shardings=(rep,) * num_broadcast + (rows,) * num_batched,
                 out_shardings=rows)


# Memory-sized chunks.
def device_memory_bytes(device: Optional[Any] = None) -> Optional[int]:
  """``memory_stats()["bytes_limit"]`` of one device, or None when not reported (CPU)."""
  device = jax.local_devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without memory stats raise)
    stats = None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def estimate_bytes_per_example(fn: Callable, *example_batched: Any, broadcast: Sequence[Any] = ()) -> int:
  """Device bytes per example of ``fn(*broadcast, *batched)``, from XLA's compiled memory analysis: compiles
  (without running) at batch sizes b1 = 8 and b2 = 16 and returns ``ceil((M(b2) - M(b1)) / 8)`` with M =
  argument + output + temporary - aliased bytes, so the parameters, which do not grow with the batch,
  cancel out. Only the shapes and dtypes of ``example_batched`` (>= 1 row each) are used."""
  b1, b2 = 8, 16
  _leading(example_batched, "estimate_bytes_per_example")
  spec = lambda a, rows=None: jax.ShapeDtypeStruct(
      np.shape(a) if rows is None else (rows,) + np.shape(a)[1:], np.asarray(a).dtype)
  bspec = jax.tree_util.tree_map(spec, tuple(broadcast))

  def total(b):
    xs = jax.tree_util.tree_map(lambda a: spec(a, b), example_batched)
    m = jax.jit(lambda *args: fn(*args)).lower(*bspec, *xs).compile().memory_analysis()
    if m is None:
      raise ValueError("estimate_bytes_per_example: this backend gives no memory analysis; pass "
                       "bytes_per_example or chunk_size explicitly")
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

  return max(1, math.ceil((total(b2) - total(b1)) / (b2 - b1)))


def pick_chunk_size(bytes_per_example: Optional[int] = None, *, num_devices: Optional[int] = None,
                    memory_bytes: Optional[int] = None, memory_fraction: float = 0.5,
                    max_chunk_size: Optional[int] = None) -> int:
  """Examples per chunk: ``num_devices * floor(memory_fraction * memory_bytes / bytes_per_example)``, with
  ``num_devices`` every global device and ``memory_bytes`` :func:`device_memory_bytes` by default; when
  either figure is missing (CPU, no estimate) a device takes ``DEFAULT_EXAMPLES_PER_DEVICE``. Capped near
  ``max_chunk_size``; a multiple of ``num_devices``, at least ``num_devices``."""
  nd = jax.device_count() if num_devices is None else int(num_devices)
  if nd < 1:
    raise ValueError(f"pick_chunk_size: num_devices must be >= 1, got {nd}")
  if not 0 < memory_fraction <= 1:
    raise ValueError(f"pick_chunk_size: memory_fraction must be in (0, 1], got {memory_fraction}")
  if bytes_per_example is not None and bytes_per_example < 1:
    raise ValueError(f"pick_chunk_size: bytes_per_example must be >= 1, got {bytes_per_example}")
  memory_bytes = device_memory_bytes() if memory_bytes is None else int(memory_bytes)
  per_device = (DEFAULT_EXAMPLES_PER_DEVICE if bytes_per_example is None or memory_bytes is None
                else max(1, int(memory_fraction * memory_bytes) // int(bytes_per_example)))
  chunk = per_device * nd
  if max_chunk_size is not None:
    chunk = min(chunk, round_up(max(1, int(max_chunk_size)), nd))
  return max(nd, chunk // nd * nd)


# Resumable streaming.
class _Plan(NamedTuple):
  """A stream's fixed layout: chunk ``i`` holds rows ``starts[i] : starts[i] + size`` (the last is short)."""
  n: int
  size: int
  starts: Tuple[int, ...]
  digest: str          # of key, chunk size, mode and broadcast arguments ("" without a workdir)
  workdir: Optional[str]
  name: str


def _hash(*trees: Any, extra: str = "") -> str:
  """blake2b (128 bit) of ``extra`` and every leaf's shape, dtype and bytes."""
  h = hashlib.blake2b(extra.encode(), digest_size=16)
  for leaf in jax.tree_util.tree_leaves(trees):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _chunk(batched: Tuple[Any, ...], plan: _Plan, i: int) -> Tuple[Any, ...]:
  return jax.tree_util.tree_map(lambda a: a[plan.starts[i]:plan.starts[i] + plan.size], batched)


def _chunk_path(plan: _Plan, i: int) -> str:
  return os.path.join(plan.workdir, f"chunk_{plan.starts[i]:08d}_{plan.size:06d}.msgpack")


def _load_chunk(path: str, fingerprint: str, name: str) -> Optional[PyTree]:
  """The outputs saved in ``path`` if its fingerprint is ``fingerprint``; None (with a warning) otherwise."""
  if not os.path.exists(path):
    return None
  try:
    state = checkpoint.load_pytree(path)
    if bytes(np.asarray(state["fingerprint"], np.uint8)).decode() != fingerprint:
      logging.warning("stream[%s]: %s was made by another computation (other inputs, key or parameters); "
                      "recomputing it", name, path)
      return None
    treedef = pickle.loads(np.asarray(state["treedef"], np.uint8).tobytes())  # written by _save_chunk
    leaves = [np.asarray(state["leaves"][k]) for k in sorted(state["leaves"])]
    return jax.tree_util.tree_unflatten(treedef, leaves)
  except (checkpoint.CheckpointError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:
    logging.warning("stream[%s]: cannot read %s (%s); recomputing it", name, path, e)
    return None


def _save_chunk(path: str, fingerprint: str, out: PyTree) -> None:
  leaves, treedef = jax.tree_util.tree_flatten(out)
  checkpoint.save_pytree(path, {
      "fingerprint": np.frombuffer(fingerprint.encode(), np.uint8),
      "treedef": np.frombuffer(pickle.dumps(treedef), np.uint8),
      "leaves": {f"{j:05d}": np.asarray(leaf) for j, leaf in enumerate(leaves)}})


def _make_plan(n, chunk, num_devices, broadcast, *, key, jit, workdir, name) -> _Plan:
  chunk_size = pick_chunk_size(num_devices=num_devices, max_chunk_size=n) if chunk is None else chunk
  if int(chunk_size) < 1:
    raise ValueError(f"stream_map: chunk_size must be >= 1, got {chunk_size}")
  size = round_up(min(int(chunk_size), round_up(n, num_devices)), num_devices)
  digest = _hash(broadcast, extra=f"{key}|{size}|{jit}") if workdir is not None else ""
  return _Plan(n, size, tuple(range(0, n, size)), digest, workdir, name)


def _launch(fn, broadcast, chunk, plan: _Plan, mesh: Optional[Mesh]):
  """Starts one chunk padded to ``plan.size``: jitted, sharded over ``mesh`` (async), or host-called."""
  chunk = pad_batch(chunk, plan.size)
  if mesh is None:
    return fn(*broadcast, *chunk)
  compiled = _sharded_jit(fn, mesh, len(broadcast), len(chunk))
  return compiled(*put_replicated(broadcast, mesh), *put_batch(chunk, mesh))


def _progress(plan: _Plan, done: int, i: Optional[int] = None, rows: int = 0, computed: int = 0,
              seconds: float = 0.0) -> None:
  """Logs chunk ``i`` (INFO with a workdir, ``--v=1`` without) and writes ``progress.json`` (process 0)."""
  figures = {}
  if i is not None:
    rate = computed / max(seconds, 1e-9)
    logging.vlog(0 if plan.workdir is not None else 1, "stream[%s] chunk %d/%d: %d/%d examples, %.1f ex/s, "
                 "ETA %.0fs", plan.name, i + 1, len(plan.starts), min(plan.starts[i] + plan.size, plan.n),
                 plan.n, rate, (plan.n - rows) / max(rate, 1e-9))
    figures = {"examples_done": rows, "examples_per_sec": rate, "seconds": seconds}
  if plan.workdir is not None and jax.process_index() == 0:
    checkpoint.atomic_write_json(os.path.join(plan.workdir, "progress.json"), dict(
        name=plan.name, num_examples=plan.n, chunk_size=plan.size, num_chunks=len(plan.starts),
        chunks_done=done, **figures))


def _reuse(batched, plan: _Plan) -> Tuple[dict, dict]:
  """(fingerprint per chunk, outputs of the chunks whose saved file is valid on every process)."""
  if plan.workdir is None:
    return {}, {}
  prints = {i: _hash(_chunk(batched, plan, i), extra=plan.digest) for i in range(len(plan.starts))}
  loaded = {}
  for i, fp in prints.items():
    out = _load_chunk(_chunk_path(plan, i), fp, plan.name)
    ok = out is not None   # all processes reuse or recompute the same chunks
    if ok if jax.process_count() == 1 else np.all(multihost_utils.process_allgather(np.asarray(ok))):
      loaded[i] = out
  if loaded:
    logging.info("stream[%s]: reusing %d/%d finished chunks from %s", plan.name, len(loaded),
                 len(plan.starts), plan.workdir)
  return prints, loaded


def stream_map(fn: Callable, *batched: Any, broadcast: Sequence[Any] = (), chunk_size: Optional[int] = None,
               workdir: Optional[str] = None, key: str = "", name: str = "", jit: bool = True,
               mesh: Optional[Mesh] = None) -> PyTree:
  """``fn(*broadcast, *batched)`` over an example set of any size, chunk by chunk; resumable with ``workdir``.

  ``fn(*broadcast, *batched_chunk)`` -> pytree of arrays with the chunk's leading axis; ``batched``: pytrees
  of host arrays with a common leading axis N >= 1 (the same on every process); ``broadcast`` passed whole
  (parameters). Returns the outputs for all N examples as numpy arrays, on every process.

  Every chunk has the same padded size (``chunk_size`` rounded up to a multiple of the device count; None:
  :func:`pick_chunk_size`), so one compiled program serves the stream. ``jit=True``: each chunk runs jitted
  with its rows sharded over ``mesh`` (default :func:`data_mesh`) and ``broadcast`` replicated (the next
  chunk is dispatched before the current one is fetched; ``fn`` is hashed by identity for the compile
  cache). ``jit=False``: ``fn`` is a host function called on every process with the whole padded chunk (it
  may shard itself, like ``attack.lbfgs_attack``); its outputs are gathered. ``name`` labels the logs.

  With ``workdir``, each finished chunk is written atomically (by process 0) to
  ``chunk_<start>_<size>.msgpack`` with a fingerprint: blake2b of the chunk's inputs, ``key`` (text naming
  the computation beyond its inputs, e.g. the attack options), the chunk size, the mode and the broadcast
  arguments. A chunk file is reused only if it reads back intact with the same fingerprint; a corrupted or
  foreign one is recomputed (with a warning), never trusted. A larger example set reuses the chunks of its
  prefix; ``progress.json`` gives the chunks done and the rate. The result is bit for bit that of an
  uninterrupted stream of the same chunk size.
  """
  batched, broadcast = tuple(batched), tuple(broadcast)
  n = _leading(batched, "stream_map")
  if n == 0:
    raise ValueError("stream_map: empty example set (0 examples)")
  mesh = (data_mesh() if mesh is None else mesh) if jit else None
  plan = _make_plan(n, chunk_size, mesh.size if jit else jax.device_count(), broadcast, key=key, jit=jit,
                    workdir=workdir, name=name)
  prints, outputs = _reuse(batched, plan)
  todo = [i for i in range(len(plan.starts)) if i not in outputs]
  t0, computed, left = time.perf_counter(), 0, sum(min(plan.size, n - plan.starts[i]) for i in todo)
  launch = lambda j: _launch(fn, broadcast, _chunk(batched, plan, todo[j]), plan, mesh)
  pending = launch(0) if todo else None
  for j, i in enumerate(todo):
    out = pending
    if jit and j + 1 < len(todo):  # keep the device busy while this chunk is fetched
      pending = launch(j + 1)
    k = min(plan.size, n - plan.starts[i])
    outputs[i] = unpad(gather(out), k)
    computed, left = computed + k, left - k
    if workdir is not None and jax.process_index() == 0:
      _save_chunk(_chunk_path(plan, i), prints[i], outputs[i])
    _progress(plan, len(outputs), i, n - left, computed, time.perf_counter() - t0)
    if not jit and j + 1 < len(todo):
      pending = launch(j + 1)
  if not todo:
    _progress(plan, len(outputs))
  if workdir is not None and jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"stream_map {workdir}")  # files written before anyone reads them
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *(outputs[i] for i in sorted(outputs)))
