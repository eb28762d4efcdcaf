"""The run driver of every trainer (``train.fit``): epoch scan, sweeps, resume, config guard, metrics,
checkpoints, and "restore a finished run or train it".

A trainer supplies a state (:class:`TrainState`, or a subclass adding fields such as the adversarial pools)
and ``step_fn(state, t, x, y, images, labels, hyper) -> (state, stats [C])``: ONE optimiser step of ONE model
on the mini-batch ``(x, y)``. ``t`` is the global step index (the same for every member of a sweep, so a
``lax.cond`` on it stays a branch under ``vmap``), ``images, labels`` the whole training set on the device,
``hyper`` the traced per-member hyper-parameters (e.g. the per-layer λ). Epoch e's mini-batches are the rows
of ``permutation(fold_in(PRNGKey(data_seed), e))``, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from intriguing_jax import checkpoint
from intriguing_jax import distributed
from intriguing_jax import progress
from intriguing_jax.types import Array, Params, PRNGKey

StepFn = Callable[..., Tuple[Any, Array]]


class TrainState(struct.PyTreeNode):
  """What a resumed run needs (checkpointed each epoch); trainers may subclass it to add fields.

  Attributes:
    step: int32 [] optimiser steps taken.
    epoch: int32 [] completed epochs.
    params: the trained parameters (for Flax models the "params" collection).
    opt_state: optax state.
    rng: uint32 [2] base key of the per-step randomness (dropout, pool draws).
  """
  step: Array
  epoch: Array
  params: Params
  opt_state: Any
  rng: PRNGKey


def state_fields(params: Params, tx: optax.GradientTransformation, rng: PRNGKey) -> Dict[str, Any]:
  """The :class:`TrainState` fields of a fresh run (``TrainState(**state_fields(...))``)."""
  return dict(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
              opt_state=tx.init(params), rng=rng)


def apply_gradients(state: TrainState, grads: Params, tx: optax.GradientTransformation) -> TrainState:
  """One optimiser update; ``step`` + 1."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


def make_epoch_fn(step_fn: StepFn, *, num_train: int, batch_size: int, stacked: bool = False) -> Callable:
  """``epoch_fn(state, images, labels, perm_key, epoch, hyper) -> (state, stats)``, jitted, state donated.

  One epoch = ``num_train // batch_size`` steps over the rows of ``permutation(perm_key, num_train)`` (the
  last incomplete batch dropped); ``epoch`` (int32 []) numbers the global steps ``t``. ``stats`` is
  [steps, C], or [k, steps, C] with ``stacked`` (state and ``hyper`` with a leading member axis [k]).
  """
  steps = num_train // batch_size
  if steps < 1:
    raise ValueError(f"batch_size {batch_size} is larger than the {num_train} training examples")

  def member_epoch(state, perm, ts, images, labels, hyper):
    def body(st, xs):
      idx, t = xs
      return step_fn(st, t, images[idx], labels[idx], images, labels, hyper)

    state, stats = jax.lax.scan(body, state, (perm, ts))
    return state.replace(epoch=state.epoch + 1), stats

  if stacked:
    member_epoch = jax.vmap(member_epoch, in_axes=(0, None, None, None, None, 0))

  def epoch_fn(state, images, labels, perm_key, epoch, hyper):
    perm = jax.random.permutation(perm_key, num_train)[: steps * batch_size].reshape(steps, batch_size)
    ts = epoch * steps + jnp.arange(steps, dtype=jnp.int32)
    return member_epoch(state, perm, ts, images, labels, hyper)

  return jax.jit(epoch_fn, donate_argnums=(0,))


def _placement(members: Optional[int], mesh: Optional[Mesh]):
  """(place_members, place_shared, to_host) for one model (None) or k sweep members: members padded to a
  multiple of the mesh size with copies of member 0 and sharded, shared inputs replicated; ``to_host``
  gathers and drops the padding."""
  if members is None:
    return (lambda t: jax.tree.map(jnp.asarray, t), lambda t: jax.tree.map(jnp.asarray, t),
            lambda t: jax.tree.map(np.asarray, t))
  mesh = distributed.data_mesh() if mesh is None else mesh
  padded = distributed.round_up(members, mesh.size)
  if padded != members:
    logging.info("sharding %d members over %d devices (%d padding copies)", members, mesh.size,
                 padded - members)
  return (lambda t: distributed.put_batch(distributed.pad_batch(t, padded), mesh),
          lambda t: distributed.put_replicated(t, mesh),
          lambda t: distributed.unpad(distributed.gather(t), members))


def _resume(state, workdir: Optional[str], run_info: Any, prefix: str):
  if not workdir:
    return state
  checkpoint.guard_run_config(workdir, run_info)
  ckpt_dir = os.path.join(workdir, "ckpt")
  restored, step = checkpoint.restore_checkpoint(ckpt_dir, target=state)
  if step is None:
    return state
  logging.info("%sresumed from %s at epoch %d", prefix, ckpt_dir, step)
  return jax.tree.map(jnp.asarray, restored)


def _record(stats: np.ndarray, summarise: Callable, members: Optional[int]) -> Dict[str, Any]:
  if members is None:
    return summarise(stats)
  per_member = [summarise(s) for s in stats]
  return {name: [m[name] for m in per_member] for name in per_member[0]}


def _earlier_records(path: str, start: int, prefix: str) -> List[Dict[str, Any]]:
  """The history of epochs 1..start of a resumed run, from its ``metrics.jsonl`` (newest record per
  epoch, without the writer's "time"); a warning names the epochs it lacks."""
  by_epoch = {}
  for record in progress.read_metrics(path):
    epoch = record.get("epoch")
    if isinstance(epoch, int) and 1 <= epoch <= start:
      by_epoch[epoch] = {k: v for k, v in record.items() if k != "time"}
  missing = sorted(set(range(1, start + 1)) - set(by_epoch))
  if missing:
    logging.warning("%sno metrics of epochs %s in %s: the history starts without them", prefix, missing, path)
  return [by_epoch[e] for e in sorted(by_epoch)]


def run(state, epoch_fn: Callable, images, labels, hyper, *, epochs: int, data_seed: int,
        summarise: Callable[[np.ndarray], Dict[str, Any]], evaluate: Optional[Callable] = None,
        checkpoint_every: int = 1, workdir: Optional[str] = None, run_info: Any = None,
        stop_after_epoch: Optional[int] = None, members: Optional[int] = None, mesh: Optional[Mesh] = None,
        prefix: str = "") -> Tuple[Any, List[Dict[str, Any]]]:
  """The epoch loop: resume, train epochs ``[state.epoch, last)``, log, evaluate, checkpoint; returns (final
  state on the host devices, history: one record per epoch up to ``last``; those of epochs before a resume
  are read back from ``metrics.jsonl``, the newest record of each).

  ``state``: the fresh state (the checkpoint target), a leading [k] axis with ``members=k`` sweep members
  (sharded over ``mesh``, default all devices; ``epoch_fn`` then ``stacked``). ``summarise``: one member's
  epoch record from its stats [steps, C] (sweeps: each value a [k] list); ``evaluate(params) -> error``,
  logged as "eval_error". ``workdir``: ``run_config.json`` (``run_info``, guarded), ``metrics.jsonl`` and
  ``ckpt/`` (None: nothing written). ``stop_after_epoch``: return after it, as if interrupted.

  Raises:
    ValueError: ``stop_after_epoch`` outside [1, epochs], or a workdir holding a run with other settings.
  """
  if stop_after_epoch is not None and not 1 <= stop_after_epoch <= epochs:
    raise ValueError(f"stop_after_epoch must be in [1, epochs={epochs}], got {stop_after_epoch}")
  state = _resume(state, workdir, run_info, prefix)
  place, shared, to_host = _placement(members, mesh)
  start = int(np.max(np.asarray(state.epoch)))
  state, hyper = place(state), place(hyper)
  images, labels = shared((np.asarray(images), np.asarray(labels)))
  writer = progress.MetricWriter(workdir, prefix=prefix)
  data_key = jax.random.PRNGKey(int(data_seed))
  history = _earlier_records(writer.path, start, prefix) if writer.path and start else []
  last = epochs if stop_after_epoch is None else stop_after_epoch
  for epoch in range(start, last):
    t0 = time.perf_counter()
    perm_key, epoch_d = shared((jax.random.fold_in(data_key, epoch), np.int32(epoch)))
    state, stats = epoch_fn(state, images, labels, perm_key, epoch_d, hyper)
    record = {"epoch": epoch + 1, **_record(to_host(stats), summarise, members)}  # blocks
    record["seconds"] = time.perf_counter() - t0
    if evaluate is not None:
      record["eval_error"] = evaluate(state.params)
    history.append(record)
    writer.write(**record)
    if workdir and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == last):
      saved = to_host(state)  # every process takes part in the gather; process 0 writes
      if jax.process_index() == 0:
        checkpoint.save_checkpoint(os.path.join(workdir, "ckpt"), saved, step=epoch + 1)
  return jax.tree.map(jnp.asarray, to_host(state)), history


def restore_or_run(run_dir: str, settings: Dict[str, Any],
                   run_fn: Callable[[], Tuple[Params, Dict[str, Any]]], *, target: Any = None,
                   who: str = "") -> Tuple[Params, Dict[str, Any]]:
  """The finished run in ``run_dir`` (``final.msgpack`` + ``result.json``), or ``run_fn()`` saved there.

  ``run_fn() -> (variables, result dict)``; ``settings`` (JSON-able) are stored in the result under
  "settings" and must equal the stored ones for a finished run to be restored. ``target``: the variables'
  structure (e.g. ``jax.eval_shape(model.init, ...)``), whose shapes the restored file must have.

  A ``result.json`` or ``final.msgpack`` that cannot be read back (truncated, corrupted) is reported and
  the run computed again (``run_fn`` resumes from the run's intact checkpoints where it keeps them).

  Raises:
    ValueError: ``run_dir`` holds a finished run with other settings (named).
    checkpoint.CheckpointError: ``final.msgpack`` holds another architecture (shapes named).
  """
  result_path, final_path = os.path.join(run_dir, "result.json"), os.path.join(run_dir, "final.msgpack")
  want = checkpoint.jsonable(settings)
  if os.path.exists(result_path) and os.path.exists(final_path):
    try:
      result = checkpoint.read_json(result_path)
      checkpoint.check_settings(run_dir, result.get("settings") or {}, want, "a finished run")
      variables = jax.tree.map(jnp.asarray, checkpoint.load_pytree(final_path, target))
      logging.info("%srestored from %s", f"{who}: " if who else "", run_dir)
      return variables, result
    except checkpoint.CorruptFileError as e:
      logging.warning("%s%s; computing the run again", f"{who}: " if who else "", e)
  variables, result = run_fn()
  result = {**result, "settings": want}
  checkpoint.save_pytree(final_path, variables)
  checkpoint.atomic_write_json(result_path, result)
  return variables, result
