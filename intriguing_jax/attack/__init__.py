"""Adversarial search of Szegedy et al. §4.1: box-constrained L-BFGS with a search over the penalty c.

Usage::

    import functools
    from intriguing_jax import attack
    # Any JAX-traceable logits function of a batch works:
    res = attack.lbfgs_attack(functools.partial(model.apply, variables), x, target)
    # ... or pass the parameters separately so that one compiled program serves every model of the
    # same architecture (and new parameters never trigger a recompile):
    res = attack.lbfgs_attack(model.apply, x, target, params=variables)
    res.x_adv, res.success, res.c, res.distortion          # [B, ...], [B] bool, [B], [B] RMS
    res = attack.lbfgs_attack(model.apply, x, labels, params=variables, untargeted=True)
    # Inside your own jit (no host-side checks): a pure function of (params, x, target).
    res = jax.jit(attack.make_attack(model.apply, maxiter=10))(variables, x, target)

    noisy = attack.gaussian_noise(key, x, 0.1)                       # Table 2/4 noise rows
    magnified = attack.scale_perturbation(x, res.x_adv, 0.1)         # Table 4 "amplified to stddev 0.1"

The method (paper.md §3, A1-A4): for each example and a target label l, minimise

    c * penalty(x' - x) + loss_f(x', l)     subject to  x' in [lower, upper]^m

with L-BFGS-B started at x' = x, and search for the LARGEST c (smallest perturbation) whose minimiser is
classified l. All of it is one jit-compiled program:

1.-2. the c search (``schedule="continuous"``, default): every example scans a geometric grid of c
   values from the LARGEST c down to its first success (the largest succeeding grid c), then bisects c
   in log-space ``num_bisection`` times between it and the failing grid value above it (an example with
   no success on the grid walks below it instead, one grid ratio per solve, toward pure loss
   minimisation); every solve after the first is warm-started. The solves run on the rows of a
   batched, restartable projected L-BFGS (``solver.rows_step``, one objective evaluation per trip for
   every row): a row starts its example's next solve the moment the previous one ends, and takes the
   next queued example when its example is done, so no example waits for another. With
   ``schedule="rounds"`` the whole grid is solved at once, vmapped over examples x c (``grid_parallel``)
   and ``num_bisection`` bisection rounds follow in lock step, each as long as its slowest example
   (measured ~10x slower on CPU, notes/attack.md);
3. (``refine=True``, default) a final refinement toward the decision boundary. Why it is needed: with
   cross-entropy, the gradient of the loss at the boundary is sum_j p_j (w_j - w_l), which mixes in every
   class with p_j > 0, not only the classes whose constraints are active, so the penalty minimisers
   r(c) cross the boundary away from the closest boundary point (even at the best c: ~2.7% above the
   exact optimum for FC10 on MNIST, notes/attack.md). The refinement (a) projects x onto the target
   region's boundary linearised at the best point (a small QP solved through its k-variable dual; exact
   for a linear model), pulling back toward the best point until the model agrees, for
   ``refine_rounds`` rounds, then (b) bisects t in [0, 1] for the smallest t with
   f(x + t (x_adv - x)) = l. A refined point is kept only if the model classifies it l and it is closer.
   Every point returned was evaluated by the model: ``success`` is that check.

A success must beat every other class by ``success_margin`` logits (default 1e-3): a point sitting
exactly on the decision boundary could flip when the model is re-evaluated with another batch size or
device, so the margin keeps the flag reproducible. ``success_margin=0`` is the plain argmax test. The
refinement stops at twice that margin (at least success_margin + 1e-4), never at the threshold itself,
so the flags do not depend on the batch shape or the device count.

The box-constrained L-BFGS lives in ``solver.py`` only: ``rows_step`` (the continuous schedule's batched
stepper) and ``box_lbfgs`` (one problem, vmapped by the rounds schedule; a ``lax.while_loop`` that stops
when the slowest member of the batch converges). Two solvers: ``solver="projected"`` (default), our
two-metric projected L-BFGS, which matches scipy's L-BFGS-B objective values in as many iterations; and
``solver="jaxopt"``, ``jaxopt.LBFGSB.update`` steps (``unroll=False``), kept for comparison: on these
float32 objectives its line search fails repeatedly and it stalls several percent above the minimum
(notes/attack.md). When several devices are visible the example axis is sharded over the 1-D data mesh
of ``intriguing_jax.distributed`` (ragged batches padded and the padding dropped; multi-host outputs
gathered on every process).

Compilation: one program per (logits function, input shape, options). ``logits_fn`` is a static argument
hashed by identity, so reuse the same function object: with ``params=`` the function is e.g.
``model.apply`` (stable) and the parameters are ordinary traced arguments, so new weights, new data, or a
different model of the same architecture reuse the compiled program.
"""

from intriguing_jax.attack.engine import (AttackOptions, AttackResult, DEFAULT_C_GRID, LOSSES, PENALTIES,
                                          SCHEDULES, SOLVERS, _attack_impl, _compiled, lbfgs_attack,
                                          make_attack)
from intriguing_jax.attack.perturbations import gaussian_noise, random_targets, scale_perturbation
from intriguing_jax.attack.solver import box_lbfgs, boundary_projection

__all__ = ("AttackOptions", "AttackResult", "DEFAULT_C_GRID", "LOSSES", "PENALTIES", "SCHEDULES", "SOLVERS",
           "lbfgs_attack", "make_attack", "gaussian_noise", "random_targets", "scale_perturbation", "box_lbfgs",
           "boundary_projection")
