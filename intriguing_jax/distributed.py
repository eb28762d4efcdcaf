"""Scale-out with JAX's own machinery: a 1-D data mesh, sharded batched calls, multi-host, resumable streaming.

Usage::

    import functools
    from intriguing_jax import distributed

    distributed.initialize()                # multi-host: reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
                                            # JAX_PROCESS_ID (or a SLURM/TPU/MPI environment); no-op otherwise
    mesh = distributed.data_mesh()          # 1-D mesh ("batch",) over every device of every process

    # A pure batched function, its batch axis sharded over the mesh; ragged batches are padded (with copies
    # of the first example) and the padding dropped; results come back as numpy on every process:
    logits = distributed.sharded_apply(model.apply, x, broadcast=(variables,))      # model.apply(variables, x)

    # Stream a large example set in chunks sized to device memory, resumable: every finished chunk is
    # saved atomically to workdir, a killed run continues from the last finished chunk.
    out = distributed.stream_map(fn, x, targets, broadcast=(variables,), workdir="runs/attack_fc100",
                                 bytes_per_example=distributed.estimate_bytes_per_example(
                                     fn, x[:1], targets[:1], broadcast=(variables,)))

    # A host-level function that shards itself (e.g. attack.lbfgs_attack) streams with jit=False:
    res = distributed.stream_map(lambda x, t: attack.lbfgs_attack(model.apply, x, t, params=variables),
                                 x, targets, jit=False, chunk_size=2000, workdir="runs/attack_fc100")

Conventions:

* The mesh has one axis, ``BATCH_AXIS = "batch"``; batched arguments are sharded along their axis 0
  (``NamedSharding(mesh, P("batch"))``), broadcast arguments (parameters) are replicated, and ``jax.jit``
  with ``in_shardings``/``out_shardings`` lets XLA place the computation (no ``shard_map``, no scheduler).
  One compiled program per (function, mesh, argument shapes): chunks are padded to a fixed size.
* Multi-host (SPMD): every process calls the same functions with the same full data (MNIST fits on
  every host); process ``i`` only feeds the rows of its own devices, which form the contiguous block
  :func:`process_slice` of the padded batch, and the outputs are gathered with
  ``multihost_utils.process_allgather`` so every process gets all results, without loss or duplication.
  With ``jit=False`` (host-level functions) each process runs the function on its contiguous slice of
  every chunk and the slices are gathered the same way (or, with ``split_processes=False``, every process
  calls a globally-sharded function on the whole chunk and its global outputs are gathered). Only process 0 writes stream files (the workdir
  must be on a shared filesystem for resumption across hosts).
* Functions given to :func:`sharded_apply` / :func:`stream_map` must map batched arguments to a pytree of
  arrays with the same leading batch axis (no per-batch reductions: padding rows would leak into them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import pickle
import time
from typing import Any, Callable, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from intriguing_jax import checkpoint
from intriguing_jax import progress

PyTree = Any

BATCH_AXIS = "batch"
_PROGRESS_FILE = "progress.json"
_TREEDEF_FILE = "treedef.pkl"
_STREAM_FORMAT = 1
# Chunk size used when the device reports no memory limit (CPU) and no estimate is given, per device.
DEFAULT_EXAMPLES_PER_DEVICE = 1024


# --------------------------------------------------------------------------------------------------
# Processes and meshes.


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, local_device_ids: Optional[Sequence[int]] = None,
               auto_detect: bool = False) -> bool:
  """Starts multi-host JAX (``jax.distributed.initialize``) when a multi-process setting is configured.

  Settings come from the arguments, else the usual environment variables ``JAX_COORDINATOR_ADDRESS``
  (host:port of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``, read
  by JAX itself). With nothing configured this is a no-op for a single process, unless ``auto_detect``
  lets JAX detect a cluster (SLURM, Open MPI, TPU pod, Kubernetes). Safe to call twice. Must run before
  any other JAX call that touches devices.

  Returns:
    True when this is a multi-process run (``jax.process_count() > 1`` after initialisation).

  Raises:
    ValueError: an incomplete or inconsistent setting (e.g. a coordinator but no process count).
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None

  def _int(value, name):
    if value is None or value == "":
      return None
    try:
      return int(value)
    except (TypeError, ValueError):
      raise ValueError(f"initialize: {name} must be an integer, got {value!r}") from None

  num_processes = _int(num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES"),
                       "num_processes (JAX_NUM_PROCESSES)")
  process_id = _int(process_id if process_id is not None else env.get("JAX_PROCESS_ID"),
                    "process_id (JAX_PROCESS_ID)")
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit) and not auto_detect:
    logging.info("distributed.initialize: no multi-process setting; single process")
    return False
  if not auto_detect and any(v is None for v in explicit):
    raise ValueError("initialize: a multi-process run needs coordinator_address (JAX_COORDINATOR_ADDRESS), "
                     "num_processes (JAX_NUM_PROCESSES) and process_id (JAX_PROCESS_ID); got "
                     f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"initialize: num_processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"initialize: process_id must be in [0, {num_processes}), got {process_id}")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id,
                             local_device_ids=list(local_device_ids) if local_device_ids is not None else None)
  logging.info("distributed.initialize: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def data_mesh(devices: Optional[Sequence[Any]] = None, *, local: bool = False,
              axis_name: str = BATCH_AXIS) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all global devices, or the local ones with ``local=True``).

  Devices are ordered by (process, id), so each process owns a contiguous block of the batch axis.
  """
  if devices is None:
    devices = jax.local_devices() if local else jax.devices()
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  if not devices:
    raise ValueError("data_mesh: no devices")
  return Mesh(np.asarray(devices), (axis_name,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows (axis 0) split over the mesh's single axis."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def process_slice(n: int, multiple: int = 1, *, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> slice:
  """The contiguous block of ``n`` examples that one process handles.

  The batch is padded to ``m = process_count * ceil(n / (process_count * multiple)) * multiple`` rows and
  process ``i`` takes rows ``[i m / P, (i+1) m / P)``, clipped to ``n`` (the last blocks may be short or
  empty). Concatenating the blocks in process order gives back the ``n`` examples exactly once.
  """
  p = jax.process_count() if process_count is None else int(process_count)
  i = jax.process_index() if process_index is None else int(process_index)
  if n < 0 or multiple < 1 or p < 1 or not 0 <= i < p:
    raise ValueError(f"process_slice: need n >= 0, multiple >= 1, 0 <= process_index < process_count; got "
                     f"n={n}, multiple={multiple}, process_index={i}, process_count={p}")
  per = math.ceil(n / (p * multiple)) * multiple
  return slice(min(i * per, n), min((i + 1) * per, n))


# --------------------------------------------------------------------------------------------------
# Padding, placement and gathering.


def _leading(tree: PyTree, where: str) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f"{where}: no batched arrays given")
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
  if -1 in sizes:
    raise ValueError(f"{where}: batched arguments must have a leading batch axis, got a scalar")
  if len(sizes) != 1:
    raise ValueError(f"{where}: batched arguments disagree on the batch size: {sorted(sizes)}")
  return sizes.pop()


def pad_batch(tree: PyTree, size: int) -> PyTree:
  """Pads every leaf's axis 0 to ``size`` rows with copies of its first row (valid inputs, e.g. in-box
  images, so padding never produces NaN). Leaves must be non-empty numpy-convertible arrays."""
  def pad(a):
    a = np.asarray(a)
    k = a.shape[0]
    if k > size:
      raise ValueError(f"pad_batch: {k} rows do not fit in {size}")
    if k == size:
      return a
    if k == 0:
      raise ValueError("pad_batch: cannot pad an empty batch")
    return np.concatenate([a, np.repeat(a[:1], size - k, axis=0)], axis=0)
  return jax.tree_util.tree_map(pad, tree)


def unpad(tree: PyTree, n: int) -> PyTree:
  """The first ``n`` rows of every leaf."""
  return jax.tree_util.tree_map(lambda a: a[:n], tree)


def round_up(n: int, multiple: int) -> int:
  return -(-int(n) // int(multiple)) * int(multiple)


def put_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places host arrays (the same full arrays on every process) sharded along axis 0 over ``mesh``.

  Axis 0 must be a multiple of ``mesh.size``. Each process transfers only the rows of its own devices.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx, a=np.asarray(a): a[idx]), tree)


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree (parameters) on every device of ``mesh``."""
  sharding = replicated_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx, a=np.asarray(a): a[idx]), tree)


def gather(tree: PyTree) -> PyTree:
  """Global (possibly multi-host) arrays -> full numpy arrays on every process."""
  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return multihost_utils.process_allgather(a, tiled=True)
    return np.asarray(a)
  return jax.tree_util.tree_map(get, tree)


def gather_process_shards(local: PyTree, n: int, multiple: int = 1) -> PyTree:
  """Concatenates, in process order, the per-process results of :func:`process_slice` blocks of ``n`` rows.

  Each process passes the outputs of its own block; the result (numpy, on every process) has ``n`` rows.
  """
  local = jax.tree_util.tree_map(np.asarray, local)
  if jax.process_count() == 1:
    return unpad(local, n)
  per = math.ceil(n / (jax.process_count() * multiple)) * multiple
  k = _leading(local, "gather_process_shards") if jax.tree_util.tree_leaves(local) else 0
  if k == 0:
    raise ValueError("gather_process_shards: a process got an empty block; use fewer processes or more examples")
  full = multihost_utils.process_allgather(pad_batch(local, per), tiled=True)
  return unpad(full, n)


# --------------------------------------------------------------------------------------------------
# Sharded application.


@functools.lru_cache(maxsize=128)
def _sharded_jit(fn: Callable, mesh: Mesh, num_broadcast: int, num_batched: int) -> Callable:
  rows, rep = batch_sharding(mesh), replicated_sharding(mesh)
  logging.info("distributed: compiling %s over %d devices", getattr(fn, "__name__", fn), mesh.size)
  return jax.jit(lambda *args: fn(*args), in_shardings=(rep,) * num_broadcast + (rows,) * num_batched,
                 out_shardings=rows)


def _dispatch(fn: Callable, batched: Tuple[Any, ...], broadcast: Tuple[Any, ...], mesh: Mesh, size: int):
  """Pads ``batched`` to ``size`` rows, places it and calls the compiled program (asynchronously)."""
  compiled = _sharded_jit(fn, mesh, len(broadcast), len(batched))
  return compiled(*put_replicated(broadcast, mesh), *put_batch(pad_batch(batched, size), mesh))


def sharded_apply(fn: Callable, *batched: Any, broadcast: Sequence[Any] = (), mesh: Optional[Mesh] = None) -> PyTree:
  """Runs ``fn(*broadcast, *batched)`` jitted, with the batch axis of ``batched`` sharded over ``mesh``.

  Args:
    fn: a pure JAX function; ``fn(*broadcast, *batched)`` returns a pytree of arrays with the same leading
      batch axis. Hashed by identity for the compile cache: reuse the same object.
    *batched: pytrees of arrays with a common leading batch size B (any B >= 1; padded to a multiple of the
      number of devices with copies of the first example and the padding dropped).
    broadcast: arguments passed whole to every device (parameters), placed first.
    mesh: a 1-D mesh (default :func:`data_mesh`, all global devices).

  Returns:
    The outputs as numpy arrays, B rows each, on every process.
  """
  mesh = data_mesh() if mesh is None else mesh
  n = _leading(batched, "sharded_apply")
  if n == 0:
    raise ValueError("sharded_apply: empty batch (0 examples)")
  out = _dispatch(fn, tuple(batched), tuple(broadcast), mesh, round_up(n, mesh.size))
  return unpad(gather(out), n)


# --------------------------------------------------------------------------------------------------
# Memory-sized chunks.


def device_memory_bytes(device: Optional[Any] = None) -> Optional[int]:
  """Memory available to one device (``bytes_limit`` of ``memory_stats()``), or None when not reported (CPU)."""
  device = jax.local_devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without memory stats raise)
    stats = None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"])


def estimate_bytes_per_example(fn: Callable, *example_batched: Any, broadcast: Sequence[Any] = (),
                               batch_sizes: Tuple[int, int] = (8, 16)) -> int:
  """Device memory per example of ``fn(*broadcast, *batched)``, from XLA's compiled memory analysis.

  Compiles (without running) the function at two batch sizes on one device and returns the slope of
  argument + output + temporary bytes; parameters, which do not grow with the batch, cancel out.

  Args:
    fn: as in :func:`sharded_apply`.
    *example_batched: batched arguments with at least one row (only shapes and dtypes are used).
  """
  b1, b2 = (int(b) for b in batch_sizes)
  if not 1 <= b1 < b2:
    raise ValueError(f"estimate_bytes_per_example: batch_sizes must be 1 <= b1 < b2, got {batch_sizes}")
  _leading(example_batched, "estimate_bytes_per_example")
  spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype)
  bspec = jax.tree_util.tree_map(spec, tuple(broadcast))

  def total(b):
    xs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((b,) + tuple(np.shape(a)[1:]), a.dtype),
                                jax.tree_util.tree_map(np.asarray, example_batched))
    m = jax.jit(lambda *args: fn(*args)).lower(*bspec, *xs).compile().memory_analysis()
    if m is None:
      raise ValueError("estimate_bytes_per_example: this backend gives no memory analysis; pass "
                       "bytes_per_example or chunk_size explicitly")
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

  return max(1, math.ceil((total(b2) - total(b1)) / (b2 - b1)))


def pick_chunk_size(bytes_per_example: Optional[int] = None, *, num_devices: Optional[int] = None,
                    memory_bytes: Optional[int] = None, memory_fraction: float = 0.5,
                    max_chunk_size: Optional[int] = None) -> int:
  """Examples per chunk: the most that fit in ``memory_fraction`` of each device's memory, times the devices.

  Args:
    bytes_per_example: device memory one example needs (:func:`estimate_bytes_per_example`); None uses
      ``DEFAULT_EXAMPLES_PER_DEVICE`` per device.
    num_devices: devices sharing a chunk (default: all global devices).
    memory_bytes: memory of one device (default :func:`device_memory_bytes`; on CPU, where none is reported,
      ``DEFAULT_EXAMPLES_PER_DEVICE`` per device).
    memory_fraction: share of the memory a chunk may use, in (0, 1].
    max_chunk_size: upper bound (e.g. the number of examples).

  Returns:
    A multiple of ``num_devices``, at least ``num_devices``.
  """
  nd = jax.device_count() if num_devices is None else int(num_devices)
  if nd < 1:
    raise ValueError(f"pick_chunk_size: num_devices must be >= 1, got {nd}")
  if not 0 < memory_fraction <= 1:
    raise ValueError(f"pick_chunk_size: memory_fraction must be in (0, 1], got {memory_fraction}")
  if bytes_per_example is not None and bytes_per_example < 1:
    raise ValueError(f"pick_chunk_size: bytes_per_example must be >= 1, got {bytes_per_example}")
  memory_bytes = device_memory_bytes() if memory_bytes is None else int(memory_bytes)
  if bytes_per_example is None or memory_bytes is None:
    per_device = DEFAULT_EXAMPLES_PER_DEVICE
  else:
    per_device = max(1, int(memory_fraction * memory_bytes) // int(bytes_per_example))
  chunk = per_device * nd
  if max_chunk_size is not None:
    chunk = min(chunk, round_up(max(1, int(max_chunk_size)), nd))
  return max(nd, chunk // nd * nd)


# --------------------------------------------------------------------------------------------------
# Resumable streaming.


def _fingerprint(batched, broadcast, extra) -> str:
  h = hashlib.blake2b(digest_size=16)
  h.update(repr(extra).encode())
  for leaf in jax.tree_util.tree_leaves((batched, broadcast)):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _chunk_path(workdir: str, i: int) -> str:
  return os.path.join(workdir, f"chunk_{i:06d}.msgpack")


@dataclasses.dataclass
class _Stream:
  workdir: Optional[str]
  record: dict
  treedef: Any = None


def _open_stream(workdir: Optional[str], record: dict) -> Tuple[_Stream, int]:
  """Validates ``workdir`` against ``record``; returns the stream and the number of finished chunks."""
  stream = _Stream(workdir, record)
  if workdir is None:
    return stream, 0
  path = os.path.join(workdir, _PROGRESS_FILE)
  if not os.path.exists(path):
    return stream, 0
  old = checkpoint.read_json(path)
  keys = ("format", "num_examples", "chunk_size", "fingerprint")
  diff = [k for k in keys if old.get(k) != record[k]]
  if diff:
    raise ValueError(f"stream_map: {workdir} holds a run with other settings ({', '.join(diff)}); use another "
                     "workdir or delete it")
  done = int(old.get("chunks_done", 0))
  tpath = os.path.join(workdir, _TREEDEF_FILE)
  if done and os.path.exists(tpath):
    with open(tpath, "rb") as f:
      stream.treedef = pickle.load(f)  # written by this module (a jax PyTreeDef), never user input
  else:
    done = 0
  while done and not os.path.exists(_chunk_path(workdir, done - 1)):  # files removed by hand: redo them
    done -= 1
  return stream, done


def _save_chunk(stream: _Stream, i: int, out: PyTree, done: int, writer: Optional[progress.MetricWriter],
                **log: Any) -> None:
  leaves, treedef = jax.tree_util.tree_flatten(out)
  if stream.treedef is None:
    stream.treedef = treedef
  if stream.workdir is None or jax.process_index() != 0:
    return
  tpath = os.path.join(stream.workdir, _TREEDEF_FILE)
  if not os.path.exists(tpath):
    checkpoint.atomic_write_bytes(tpath, pickle.dumps(treedef))
  checkpoint.save_pytree(_chunk_path(stream.workdir, i), {f"{j:05d}": leaf for j, leaf in enumerate(leaves)})
  checkpoint.atomic_write_json(os.path.join(stream.workdir, _PROGRESS_FILE), dict(stream.record, chunks_done=done))
  if writer is not None:
    writer.write(chunk=i, chunks_done=done, **log)


def _load_chunk(stream: _Stream, i: int) -> PyTree:
  state = checkpoint.load_pytree(_chunk_path(stream.workdir, i))
  leaves = [np.asarray(state[k]) for k in sorted(state)]
  return jax.tree_util.tree_unflatten(stream.treedef, leaves)


def stream_map(fn: Callable, *batched: Any, broadcast: Sequence[Any] = (), chunk_size: Optional[int] = None,
               bytes_per_example: Optional[int] = None, memory_fraction: float = 0.5, workdir: Optional[str] = None,
               key: str = "", name: str = "", jit: bool = True, split_processes: bool = True,
               mesh: Optional[Mesh] = None, on_chunk: Optional[Callable[[int, int], None]] = None) -> PyTree:
  """Applies ``fn`` to a large example set chunk by chunk; resumable when ``workdir`` is given.

  Every chunk has the same (padded) size, so one compiled program serves the whole stream. With ``jit=True``
  each chunk runs through :func:`sharded_apply` (batch axis sharded over ``mesh``); with ``jit=False``
  ``fn`` is called as a host function (it may shard itself, e.g. ``attack.lbfgs_attack``), each process on
  its :func:`process_slice` of every chunk. After each chunk, one absl log line gives the rate and the ETA,
  and with ``workdir`` the chunk's outputs are saved atomically (``chunk_<i>.msgpack``) and
  ``progress.json`` (chunks done, settings, input fingerprint) is replaced; a rerun of the same call loads
  the finished chunks and computes only the rest. The result equals a one-shot run.

  Args:
    fn: ``fn(*broadcast, *batched_chunk)`` -> pytree of arrays with the chunk's leading axis.
    *batched: pytrees of host arrays with a common leading axis N >= 1 (the same on every process).
    broadcast: arguments passed whole (parameters).
    chunk_size: examples per chunk (rounded up to a multiple of the device count); None: from
      :func:`pick_chunk_size` with ``bytes_per_example`` and ``memory_fraction``.
    workdir: where chunks and ``progress.json`` go (None: in memory only, nothing is written).
    key: extra text identifying the computation in the fingerprint (e.g. model name + attack options), so a
      workdir of another computation on the same data is refused instead of reused.
    name: label of the log lines.
    jit: see above.
    split_processes: (``jit=False``, multi-process) True: each process calls ``fn`` on its own block of the
      chunk (``fn`` must only use local devices); False: every process calls ``fn`` on the whole chunk (``fn``
      is itself SPMD over the global devices, like ``attack.lbfgs_attack`` today) and its global outputs are
      gathered.
    mesh: the mesh of ``jit=True`` (default :func:`data_mesh`).
    on_chunk: called as ``on_chunk(i, chunks_done)`` after chunk ``i`` is finished and saved (tests use it
      to simulate a crash).

  Returns:
    The outputs for all N examples as numpy arrays, on every process.

  Raises:
    ValueError: inconsistent batch sizes, an empty set, bad chunk settings, or a workdir holding a run with
      other inputs or settings.
  """
  batched = tuple(batched)
  broadcast = tuple(broadcast)
  n = _leading(batched, "stream_map")
  if n == 0:
    raise ValueError("stream_map: empty example set (0 examples)")
  if chunk_size is not None and int(chunk_size) < 1:
    raise ValueError(f"stream_map: chunk_size must be >= 1, got {chunk_size}")
  mesh = (data_mesh() if mesh is None else mesh) if jit else None
  nd = mesh.size if jit else jax.device_count()
  if chunk_size is None:
    chunk_size = pick_chunk_size(bytes_per_example, num_devices=nd, memory_fraction=memory_fraction,
                                 max_chunk_size=n)
  chunk_size = round_up(min(int(chunk_size), round_up(n, nd)), nd)
  starts = list(range(0, n, chunk_size))
  record = {"format": _STREAM_FORMAT, "name": name, "num_examples": n, "chunk_size": chunk_size,
            "num_chunks": len(starts), "fingerprint": None}
  if workdir is not None:
    record["fingerprint"] = _fingerprint(batched, broadcast, (key, chunk_size, jit))
  stream, done = _open_stream(workdir, record)
  if done:
    logging.info("stream[%s]: resuming at chunk %d/%d from %s", name, done, len(starts), workdir)
  writer = progress.MetricWriter(workdir, filename="progress.jsonl", prefix=f"stream[{name}] ") \
      if workdir is not None and jax.process_index() == 0 else None
  local_multiple = jax.local_device_count()

  def launch(i):
    start = starts[i]
    chunk = unpad(batched, min(start + chunk_size, n))
    chunk = jax.tree_util.tree_map(lambda a: a[start:], chunk)
    k = min(chunk_size, n - start)
    if jit:
      return k, _dispatch(fn, chunk, broadcast, mesh, chunk_size)
    if not split_processes:
      return k, fn(*broadcast, *pad_batch(chunk, chunk_size))
    sl = process_slice(chunk_size, local_multiple)
    mine = jax.tree_util.tree_map(lambda a: a[sl], pad_batch(chunk, chunk_size))
    return k, fn(*broadcast, *mine)

  def fetch(k, out):
    if jit or not split_processes:
      return unpad(gather(out), k)
    return unpad(gather_process_shards(out, chunk_size, local_multiple), k)

  outputs = [_load_chunk(stream, i) for i in range(done)]
  t_start = time.perf_counter()
  pending = launch(done) if done < len(starts) else None
  for i in range(done, len(starts)):
    k, out = pending
    # Dispatch the next chunk before blocking on this one (jit mode runs asynchronously).
    pending = launch(i + 1) if jit and i + 1 < len(starts) else None
    host = fetch(k, out)
    outputs.append(host)
    seconds = time.perf_counter() - t_start
    finished = starts[i] + k - starts[done]
    rate = finished / max(seconds, 1e-9)
    eta = (n - starts[i] - k) / max(rate, 1e-9)
    msg = ("stream[%s] chunk %d/%d: %d/%d examples, %.1f ex/s, ETA %.0fs", name, i + 1, len(starts),
           starts[i] + k, n, rate, eta)
    if workdir is not None or i + 1 == len(starts):
      logging.info(*msg)
    else:  # in-memory evaluation: keep the log short
      logging.log_every_n_seconds(logging.INFO, msg[0], 30, *msg[1:])
    _save_chunk(stream, i, host, i + 1, writer, examples_done=starts[i] + k, examples_per_sec=rate,
                seconds=seconds)
    if on_chunk is not None:
      on_chunk(i, i + 1)
    if not jit and i + 1 < len(starts):
      pending = launch(i + 1)
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *outputs)
