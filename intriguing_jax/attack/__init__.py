"""Adversarial search of Szegedy et al. §4.1: box-constrained L-BFGS with a search over the penalty c.

Usage::

    from intriguing_jax import attack
    res = attack.lbfgs_attack(model.apply, variables, x, target)          # any apply_fn(params, x)
    res.x_adv, res.success, res.c, res.distortion                         # [B, ...], [B] bool, [B], [B]
    opts = attack.AttackOptions(untargeted=True, refine=False)            # the one place defaults live
    res = attack.lbfgs_attack(model.apply, variables, x, labels, opts)
    attack_fn = attack.make_attack(model.apply, opts)                     # pure, for use inside your jit
    noisy = attack.gaussian_noise(key, x, 0.1)                            # Table 2/4 noise rows
    magnified = attack.scale_perturbation(x, res.x_adv, 0.1)              # Table 4 "amplified" rows

The method (paper.md §3, A1-A4): for each example x and target label l, minimise

    c * penalty(x' - x) + loss_f(x', l)     subject to  x' in [lower, upper]^m

with box-constrained L-BFGS started at x, and find the LARGEST c (the smallest perturbation) whose
minimiser is classified l. One jit-compiled program does all of it:

1. c search: each example scans the geometric ``c_grid`` from the largest c down to its first success,
   then bisects c in log-space ``num_bisection`` times between it and the failing grid value above (no
   success on the grid: it walks below it, one grid ratio per solve); solves after the first are
   warm-started, and (``penalty="l2_squared"``) start with a step scaled by the last solve's curvature,
   corrected for the Hessian's change 2 (c_new - c_old) I (the first solve: by 1 / 2c). They run on the
   rows of a batched, restartable L-BFGS (``attack.solver``), a row taking the next queued example when
   its example is done, so no example waits for another.
2. (``refine=True``) refinement toward the decision boundary. With cross-entropy the loss gradient at the
   boundary is sum_j p_j (w_j - w_l), which mixes in every class with p_j > 0, so the penalty minimisers
   cross the boundary away from the closest boundary point. (a) ``refine_rounds`` times: project x onto
   the target region's boundary linearised at the best point (a k-variable dual QP; exact for a linear
   model), then bisect back toward the best point until the model agrees; (b) bisect t in [0, 1] for the
   smallest t with f(x + t (x_adv - x)) = l. A refined point is kept only if it succeeds and is closer.
   The refinement keeps a margin of max(2 success_margin, success_margin + 1e-4) logits. (c) A search
   success that the batched model call finds short of ``success_margin`` (round-off at the margin) is
   moved outward along x -> x_adv until it clears it.
3. success: the target beats every other class by ``success_margin`` logits on exactly the returned
   point (untargeted: another class beats the label by it).

``lbfgs_attack`` checks its inputs on the host before compiling (the model is traced, not run; whether
its logits on x are finite is read off the program's output) and shards the batch over the devices
(on one CPU device: ``num_workers`` programs at once, one per core, each on a share of the batch);
``make_attack`` is the same program as a pure function. Evidence and measurements: notes/attack.md.
"""

from intriguing_jax.attack.engine import (AttackOptions, AttackResult, DEFAULT_C_GRID, LOSSES, PENALTIES,
                                          SOLVERS, lbfgs_attack, make_attack)
from intriguing_jax.attack.perturbations import gaussian_noise, random_targets, scale_perturbation

__all__ = ("AttackOptions", "AttackResult", "DEFAULT_C_GRID", "LOSSES", "PENALTIES", "SOLVERS",
           "lbfgs_attack", "make_attack", "gaussian_noise", "random_targets", "scale_perturbation")
