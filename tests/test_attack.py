"""Tests of intriguing_jax.attack on tiny synthetic models.

Each distinct (apply_fn, input shape, options) compiles one attack program (~5 s on 2 loaded cores), so the
tests share programs where they can; those that compile their own are marked slow.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import dot_precisions, equations
from intriguing_jax import attack, exact
from intriguing_jax.attack import engine, solver

M, K = 24, 4  # input dimension and classes of the synthetic problems
# Cheaper options than the defaults, same algorithm.
FAST = attack.AttackOptions(c_grid=(0.01, 0.1, 1.0, 10.0), num_bisection=8, maxiter=60, history_size=5)
TRACES = []   # inputs linear_apply was traced with (jit / make_jaxpr), to detect recompiles


def linear_apply(params, x):
  if isinstance(x, jax.core.Tracer):
    TRACES.append(x.shape)
  return x.reshape(x.shape[0], -1) @ params["kernel"] + params["bias"][None, :]


def mlp_apply(params, x):
  h = jax.nn.sigmoid(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"][None, :])
  return h @ params["w2"] + params["b2"][None, :]


def _linear_params(seed=0):
  rng = np.random.RandomState(seed)
  return {"kernel": jnp.asarray(rng.randn(M, K).astype(np.float32)),
          "bias": jnp.asarray(0.1 * rng.randn(K).astype(np.float32))}


def _mlp_params(seed=0):
  rng = np.random.RandomState(seed)
  return {"w1": jnp.asarray(rng.randn(M, 16).astype(np.float32)), "b1": jnp.zeros(16, jnp.float32),
          "w2": jnp.asarray(rng.randn(16, K).astype(np.float32)), "b2": jnp.zeros(K, jnp.float32)}


def _data(b, seed=1):
  return np.random.RandomState(seed).uniform(0.0, 1.0, size=(b, M)).astype(np.float32)


def _targets(apply_fn, params, x, seed=2):
  """Random wrong labels (seed) or the runner-up class (seed=None)."""
  logits = np.asarray(apply_fn(params, jnp.asarray(x)))
  if seed is None:
    return np.argsort(logits, -1)[:, -2].astype(np.int32)
  pred = np.argmax(logits, -1)
  return ((pred + np.random.RandomState(seed).randint(1, K, size=pred.shape)) % K).astype(np.int32)


def _target_margin(logits, target):
  logits = np.array(logits, np.float64)
  own = logits[np.arange(len(target)), target]
  logits[np.arange(len(target)), target] = -np.inf
  return own - logits.max(axis=1)


@pytest.fixture(scope="module")
def linear_problem():
  params = _linear_params()
  x = _data(6)
  target = _targets(linear_apply, params, x)
  sol = exact.linear_min_norm(params["kernel"], params["bias"], x, target)
  assert np.all(sol.feasible)
  return params, x, target, sol


def test_linear_matches_exact_optimum_and_success_is_real(linear_problem):
  params, x, target, sol = linear_problem
  res = attack.lbfgs_attack(linear_apply, params, x, target, FAST)
  xa = np.asarray(res.x_adv)
  assert xa.min() >= 0.0 and xa.max() <= 1.0
  assert np.all((np.asarray(res.t) >= 0) & (np.asarray(res.t) <= 1))
  pred = np.asarray(jnp.argmax(linear_apply(params, res.x_adv), -1))   # re-evaluated by us
  np.testing.assert_array_equal(np.asarray(res.success), pred == target)
  assert np.all(np.asarray(res.success))
  d = np.asarray(res.distortion)
  assert np.all(d >= sol.lower_bound * (1 - 1e-5) - 1e-7)   # a success is feasible for the QP
  np.testing.assert_allclose(d, sol.distortion, rtol=1e-2)    # float32 engine vs float64 QP
  np.testing.assert_allclose(d, np.sqrt(np.mean((xa - x) ** 2, axis=1)), rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(res.c))) and np.all(np.asarray(res.num_iter) > 0)


def test_no_retrace_on_new_data_or_new_params(linear_problem):
  params, x, target, _ = linear_problem
  jax.block_until_ready(attack.lbfgs_attack(linear_apply, params, x, target, FAST))
  n = len(TRACES)
  p2, x2 = _linear_params(1), _data(6, seed=8)
  res = jax.block_until_ready(attack.lbfgs_attack(linear_apply, p2, x2, _targets(linear_apply, p2, x2), FAST))
  assert len(TRACES) == n, "a call with new data and new params re-traced the model"
  assert np.all(np.asarray(res.success))


@pytest.mark.slow
def test_paper_method_alone_refine_false(linear_problem):
  # refine=False is the paper's method: the c search's minimiser itself (t = 1), a real success, never
  # below the exact optimum, and farther from it than the refined attack (FAST ran on the same problem).
  params, x, target, sol = linear_problem
  res = attack.lbfgs_attack(linear_apply, params, x, target, dataclasses.replace(FAST, refine=False))
  refined = attack.lbfgs_attack(linear_apply, params, x, target, FAST)
  assert np.all(np.asarray(res.success)) and np.all(np.asarray(res.t) == 1.0)
  d = np.asarray(res.distortion)
  assert np.all(d >= sol.distortion * (1 - 1e-5))
  assert np.all(d >= np.asarray(refined.distortion) * (1 - 1e-6))
  assert np.mean(d) > np.mean(sol.distortion) * 1.002, "the penalty method alone overshoots the optimum"
  assert np.mean(d) < np.mean(sol.distortion) * 1.2


@pytest.fixture(scope="module")
def mlp_batch():
  """One attack of a sigmoid MLP on a batch of 6 (one compiled program), shared by the tests below."""
  params = _mlp_params(1)
  x = _data(6, seed=5)
  target = _targets(mlp_apply, params, x, seed=None)
  return params, x, target, attack.lbfgs_attack(mlp_apply, params, x, target, FAST)


@pytest.mark.slow
def test_success_margin_clears_the_threshold(mlp_batch):
  # The refinement stops at a margin of 2e-3 logits, never at the success threshold (1e-3) itself, so the
  # flags do not flip when the points are re-evaluated with another batch shape.
  params, x, target, res = mlp_batch
  assert np.all(np.asarray(res.success))
  assert np.any(np.asarray(res.t) < 1.0)  # the refinement did move points toward the boundary
  xb = np.asarray(res.x_adv)
  batched = _target_margin(mlp_apply(params, jnp.asarray(xb)), target)
  single = np.concatenate([_target_margin(mlp_apply(params, jnp.asarray(xb[i:i + 1])), target[i:i + 1])
                           for i in range(len(target))])
  assert np.all(batched > 1e-3 + 1e-4), batched
  assert np.all(single > 1e-3 + 1e-4), single


@pytest.mark.slow
def test_make_attack_in_jit_with_a_queue_matches_lbfgs_attack(mlp_batch):
  # make_attack inside the user's jit, with 2 rows working through a queue of 6 examples: every example
  # gets the same c search as with one row each (up to float32 rounding of the other shapes), and its
  # result lands in its own row.
  params, x, target, batch = mlp_batch
  attack_fn = attack.make_attack(mlp_apply, dataclasses.replace(FAST, num_slots=2))
  queued = jax.jit(attack_fn)(params, jnp.asarray(x), jnp.asarray(target))
  np.testing.assert_array_equal(np.asarray(queued.success), np.asarray(batch.success))
  np.testing.assert_allclose(np.asarray(queued.distortion), np.asarray(batch.distortion), rtol=1e-3)
  np.testing.assert_allclose(np.asarray(queued.c), np.asarray(batch.c), rtol=1e-3)
  np.testing.assert_allclose(np.asarray(queued.num_iter), np.asarray(batch.num_iter), rtol=0.1)
  np.testing.assert_array_equal(np.asarray(jnp.argmax(mlp_apply(params, queued.x_adv), -1)), target)


@pytest.mark.slow
def test_untargeted_box_penalty_loss_and_c_below_the_grid():
  # Untargeted, a custom box, the l2 penalty and the margin loss; the only grid value is far too large,
  # so the c search must walk below the grid to succeed.
  params = _mlp_params(2)
  x = 0.25 + 0.5 * _data(6, seed=6)
  labels = np.asarray(jnp.argmax(mlp_apply(params, jnp.asarray(x)), -1)).astype(np.int32)
  opts = dataclasses.replace(FAST, untargeted=True, box=(0.25, 0.75), penalty="l2", loss="margin",
                             c_grid=(1e4,))
  res = attack.lbfgs_attack(mlp_apply, params, x, labels, opts)
  xa = np.asarray(res.x_adv)
  assert xa.min() >= 0.25 and xa.max() <= 0.75
  pred = np.asarray(jnp.argmax(mlp_apply(params, res.x_adv), -1))
  assert np.all(np.asarray(res.success)) and np.all(pred != labels)
  np.testing.assert_array_equal(np.asarray(res.pred), pred)
  c = np.asarray(res.c)
  assert np.all(c < 1e4) and np.all(np.isfinite(c))


@pytest.mark.slow
def test_jaxopt_solver_attack(linear_problem):
  # solver="jaxopt" runs jaxopt.LBFGSB behind the same c search: every success real, at the exact optimum.
  params, x, target, sol = linear_problem
  res = attack.lbfgs_attack(linear_apply, params, x, target, dataclasses.replace(FAST, solver="jaxopt"))
  ok = np.asarray(res.success)
  assert np.all(ok)
  pred = np.asarray(jnp.argmax(linear_apply(params, res.x_adv), -1))
  np.testing.assert_array_equal(ok, pred == target)
  d = np.asarray(res.distortion)
  assert np.all(d >= sol.lower_bound * (1 - 1e-5) - 1e-7)
  np.testing.assert_allclose(d, sol.distortion, rtol=1e-2)


def test_row_solver_solves_box_quadratics_with_restarts():
  # Three box-constrained convex quadratics 0.5 (z-a)' Q_r (z-a) as rows; row 1 is restarted half-way
  # from another point and must still reach its optimum (scipy's). (solver="jaxopt" is held to the exact
  # optimum through the attack, test_jaxopt_solver_attack.)
  from scipy import optimize
  rng = np.random.RandomState(0)
  n, r = 10, 3
  a = rng.uniform(-0.5, 1.5, size=(r, n)).astype(np.float32)
  b = rng.randn(r, n, n).astype(np.float32)
  q = np.einsum("rij,rkj->rik", b, b) / n + 0.1 * np.eye(n, dtype=np.float32)

  def fun(z, a1, q1):
    f = 0.5 * (z - a1) @ q1 @ (z - a1)
    return f, f

  rs = solver.row_solver(fun, 0.0, 1.0, solver="projected", maxiter=200, history_size=5, tol=1e-6, ftol=0.0)
  args = (jnp.asarray(a), jnp.asarray(q))

  @jax.jit
  def run():
    def body(i, carry):   # one step per trip; row 1 restarted from 0 before trip 15
      st, rec = carry
      st = rs.restart(st, jnp.asarray([False, True, False]) & (i == 15), jnp.zeros((r, n)))
      return rs.step(st, args), jnp.where(i == 15, st.num_iter, rec)
    return jax.lax.fori_loop(0, 315, body, (rs.init(jnp.full((r, n), 0.5), args),
                                                   jnp.zeros((r,), jnp.int32)))

  st, restarted_iter = run()
  assert int(restarted_iter[1]) == 0 and int(restarted_iter[0]) > 0
  assert np.all(np.asarray(st.done))
  for i in range(r):
    ref = optimize.minimize(lambda z: 0.5 * (z - a[i]) @ q[i] @ (z - a[i]), np.full(n, 0.5),
                            jac=lambda z: q[i] @ (z - a[i]), method="L-BFGS-B", bounds=[(0, 1)] * n,
                            options=dict(ftol=1e-15, gtol=1e-10))
    np.testing.assert_allclose(np.asarray(st.z[i]), ref.x, atol=2e-4)


@pytest.mark.parametrize("precision, expected", [("highest", jax.lax.Precision.HIGHEST),
                                                 (None, jax.lax.Precision.DEFAULT)])
def test_precision_option_reaches_every_matmul(precision, expected):
  # The whole program (solves, refinement, success check) is traced under `precision`; None keeps the
  # ambient setting, here "default" (on a GPU: TF32, whose logit error reaches the success margin).
  opts = attack.AttackOptions(maxiter=3, c_grid=(1.0,), num_bisection=1, history_size=2, precision=precision)
  with jax.default_matmul_precision("default"):
    jaxpr = jax.make_jaxpr(attack.make_attack(mlp_apply, opts))(
        _mlp_params(1), jnp.asarray(_data(2)), jnp.zeros(2, jnp.int32))
  precisions = dot_precisions(jaxpr.jaxpr)
  assert len(precisions) > 3, precisions
  assert all(p == (expected, expected) for p in precisions), precisions


def _nan_apply(params, x):
  return linear_apply(params, x) * jnp.nan


def _closure_apply(x):   # the old logits_fn(x) convention
  return x


@pytest.mark.parametrize("bad, error, match", [
    (dict(x_nan=True), ValueError, "NaN"),
    (dict(x_scale=2.0), ValueError, "outside the box"),
    (dict(x_dtype=jnp.bfloat16), ValueError, "bfloat16 is not supported; cast to float32"),
    (dict(x_dtype=np.uint8), ValueError, "uint8 is not supported"),
    (dict(target_value=K), ValueError, "target values"),
    (dict(target_value=-1), ValueError, "target values"),
    (dict(target_len=3), ValueError, "target must have shape"),
    (dict(target_float=True), ValueError, "integer labels"),
    (dict(x_1d=True), ValueError, "x must be"),
    (dict(x_width=M + 1), ValueError, r"fails on x of shape \(4, 25\)"),
    (dict(params_none=True), TypeError, "params is None"),
    (dict(apply_fn=_closure_apply), ValueError, "apply_fn\\(params, x\\) fails"),
    (dict(apply_fn=lambda p, z: jnp.sum(z, axis=1)), ValueError, "num_classes"),
])
def test_bad_input_raises_before_compiling(bad, error, match):
  params = None if bad.get("params_none") else _linear_params()
  x = _data(4, seed=3)
  if "x_width" in bad:   # one pixel more than the model takes
    x = np.concatenate([x, np.zeros((4, bad["x_width"] - M), np.float32)], axis=1)
  target = np.zeros(4, np.int32)
  if bad.get("x_nan"):
    x = x.copy()
    x[1, 3] = np.nan
  x = x * bad.get("x_scale", 1.0)
  if "x_dtype" in bad:
    x = np.asarray(jnp.asarray(x, bad["x_dtype"]))
  if "target_value" in bad:
    target = np.full(4, bad["target_value"], np.int32)
  if "target_len" in bad:
    target = np.zeros(bad["target_len"], np.int32)
  if bad.get("target_float"):
    target = target + 0.5
  if bad.get("x_1d"):
    x = x[0]
  n = engine._program._cache_size()
  with pytest.raises(error, match=match):
    attack.lbfgs_attack(bad.get("apply_fn", linear_apply), params, x, target, FAST)
  assert engine._program._cache_size() == n, "the attack was traced before the input was checked"


@pytest.mark.parametrize("num_workers", [1, 2])
def test_non_finite_logits_are_named_after_the_run(num_workers):
  # The logits' finiteness is read off the program's output (no probe call before compiling); refine=False
  # only makes the program smaller to compile.
  x = _data(4, seed=3)
  with pytest.raises(ValueError, match="NaN/inf logits on x for 4 of 4 examples"):
    attack.lbfgs_attack(_nan_apply, _linear_params(), x, np.zeros(4, np.int32),
                        dataclasses.replace(FAST, num_workers=num_workers, refine=False))


@pytest.mark.parametrize("k, rank", [(10, 10), (10, 1), (3, 2), (1, 1)])
def test_top_eigenvalue_bound_brackets_the_largest_eigenvalue(k, rank):
  a = np.random.RandomState(k + rank).randn(rank, 50).astype(np.float32)
  a = np.concatenate([a, a[:1].repeat(k - rank, 0) * 0.5])      # rows of a logit-difference Jacobian
  gram = a @ a.T
  top = float(np.linalg.eigvalsh(gram.astype(np.float64))[-1])
  bound = float(solver.top_eigenvalue_bound(jnp.asarray(gram)))
  assert top * (1 - 1e-5) <= bound <= top * k ** (2.0 ** -6) * (1 + 1e-5), (top, bound)
  assert float(solver.top_eigenvalue_bound(jnp.zeros((k, k)))) == 0.0


@pytest.mark.parametrize("field, value", [
    ("maxiter", 0), ("c_grid", ()), ("c_grid", (1.0, -1.0)), ("penalty", "l1"), ("loss", "hinge"),
    ("box", (1.0, 0.0)), ("box", (0.0,)), ("num_slots", -1), ("num_workers", -1),
    ("precision", "fastest"), ("solver", "adam"),
    ("tol", 0.0), ("ftol", float("nan")), ("success_margin", -1.0),
    ("tol", float("inf")), ("maxiter", 2.5), ("num_bisection", True), ("untargeted", "no"), ("refine", 1),
    ("c_grid", "1")])
def test_options_are_validated_when_built(field, value):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(attack.AttackOptions(), **{field: value})
  with pytest.raises(TypeError, match="AttackOptions"):
    attack.make_attack(linear_apply, {"maxiter": 3})


def test_unhashable_apply_fn_is_named():
  class Model:
    __hash__ = None

    def __call__(self, params, x):
      return linear_apply(params, x)

  with pytest.raises(ValueError, match="Non-hashable static arguments"):   # jax.jit's message
    attack.lbfgs_attack(Model(), _linear_params(), _data(2), np.zeros(2, np.int32), FAST)


def test_gaussian_noise_and_scale_perturbation():
  x = jnp.asarray(_data(64))
  noisy = attack.gaussian_noise(jax.random.PRNGKey(0), x, 0.1)
  d = np.asarray(jnp.sqrt(jnp.mean((noisy - x) ** 2, axis=1)))
  assert abs(d.mean() - 0.1) < 0.01
  assert float(jnp.max(noisy)) > 1.0  # unclipped by default (paper.md A10)
  clipped = attack.gaussian_noise(jax.random.PRNGKey(0), x, 0.1, clip=True)
  assert float(jnp.min(clipped)) >= 0.0 and float(jnp.max(clipped)) <= 1.0
  x_adv = x + 0.01 * jax.random.normal(jax.random.PRNGKey(1), x.shape)
  scaled = attack.scale_perturbation(x, x_adv, 0.1)
  np.testing.assert_allclose(np.asarray(jnp.sqrt(jnp.mean((scaled - x) ** 2, axis=1))), 0.1, rtol=1e-4)
  cos = jnp.sum((scaled - x) * (x_adv - x), 1) / (
      jnp.linalg.norm(scaled - x, axis=1) * jnp.linalg.norm(x_adv - x, axis=1))
  np.testing.assert_allclose(np.asarray(cos), 1.0, rtol=1e-5)   # the direction is kept
  np.testing.assert_array_equal(np.asarray(attack.scale_perturbation(x, x, 0.1)), np.asarray(x))
  with pytest.raises(ValueError, match="stddev"):
    attack.gaussian_noise(jax.random.PRNGKey(0), x, -1.0)


def test_random_targets_never_equal_labels_and_refuse_bad_labels():
  labels = jnp.arange(1000) % 10
  t = attack.random_targets(jax.random.PRNGKey(0), labels)
  assert np.all(np.asarray(t) != np.asarray(labels))
  assert set(np.asarray(t).tolist()) == set(range(10))
  for bad, match in (([10, 1], r"\[0, 10\)"), ([11], r"\[0, 10\)"), ([-1, 2], r"\[0, 10\)"),
                     ([3.7], "integers")):
    with pytest.raises(ValueError, match=match):
      attack.random_targets(jax.random.PRNGKey(0), np.asarray(bad))
  traced = jax.jit(lambda lb: attack.random_targets(jax.random.PRNGKey(0), lb))(labels)   # no host check
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(t))
  with jax.enable_x64(True):   # int32 as documented (it was int64 under x64), the same draws
    t64 = attack.random_targets(jax.random.PRNGKey(0), labels)
  assert t64.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(t64), np.asarray(t))


@pytest.mark.slow
def test_float64_params_under_x64_attack_in_the_dtype_of_x():
  # Under jax_enable_x64 float64 params give float64 logits; the attack still runs in x's dtype (float32) and
  # finds what it finds with float32 params (before, the c search's loop failed on a carry dtype mismatch).
  params, x = _mlp_params(4), _data(4, seed=5)
  target = _targets(mlp_apply, params, x)
  opts = attack.AttackOptions(c_grid=(0.1, 1.0, 10.0), maxiter=20, num_bisection=1, refine_rounds=1,
                              num_workers=1)
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    res = attack.lbfgs_attack(mlp_apply, params64, x, target, opts)
    assert res.x_adv.dtype == jnp.float32 and res.distortion.dtype == jnp.float32
  ref = attack.lbfgs_attack(mlp_apply, params, x, target, opts)
  np.testing.assert_array_equal(res.success, ref.success)
  assert np.all(np.asarray(res.success))
  np.testing.assert_allclose(res.distortion, ref.distortion, rtol=1e-3)


@pytest.mark.slow
def test_refinement_projects_in_blocks_on_cpu_and_in_one_vmap_on_accelerators(monkeypatch):
  # 12 examples: on CPU two blocks of 8 (the second padded), a loop over blocks (a scan); on an accelerator
  # one vmap over the batch, no such loop (blocks would launch every FISTA step's kernels batch / 8 times).
  # Both give the same attack (the same rows: num_slots given).
  params, x = _mlp_params(2), _data(12, seed=3)
  target = _targets(mlp_apply, params, x)
  opts = attack.AttackOptions(c_grid=(0.1, 1.0, 10.0), num_bisection=1, maxiter=20, refine_rounds=1,
                              num_slots=12)

  def run():
    attack_fn = attack.make_attack(mlp_apply, opts)   # a new function: traced again
    jaxpr = jax.make_jaxpr(attack_fn)(params, x, target).jaxpr
    scans = sum(e.primitive.name == "scan" for e in equations(jaxpr))
    return scans, jax.jit(attack_fn)(params, x, target)

  scans_cpu, cpu = run()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  scans_gpu, gpu = run()
  assert scans_cpu == scans_gpu + 1
  np.testing.assert_array_equal(cpu.success, gpu.success)
  np.testing.assert_allclose(cpu.distortion, gpu.distortion, rtol=1e-4)


@pytest.fixture(scope="module")
def seven(linear_problem):
  """linear_problem's 6 examples and the first again, and one program's result on them (num_workers=1)."""
  params, x, target, _ = linear_problem
  x7, t7 = np.concatenate([x, x[:1]]), np.concatenate([target, target[:1]])
  return x7, t7, attack.lbfgs_attack(linear_apply, params, x7, t7, dataclasses.replace(FAST, num_workers=1))


def test_workers_return_what_one_program_returns(linear_problem, seven):
  # Two programs at once on shares of the batch (7 examples: the second share padded) give every example
  # the result of one program over the whole batch, in order, with the padding dropped.
  params = linear_problem[0]
  x7, t7, one = seven
  two = attack.lbfgs_attack(linear_apply, params, x7, t7, dataclasses.replace(FAST, num_workers=2))
  assert two.x_adv.shape == x7.shape and two.num_evals.shape == (7,)
  np.testing.assert_array_equal(np.asarray(two.success), np.asarray(one.success))
  np.testing.assert_array_equal(np.asarray(two.num_evals), np.asarray(one.num_evals))
  np.testing.assert_allclose(np.asarray(two.x_adv), np.asarray(one.x_adv), atol=1e-5)


def test_num_evals_counts_every_solve_start_and_step(seven):
  # Every solve starts with one evaluation and every accepted step is one: at least
  # num_iter + (grid solves >= 1) + num_bisection of them, and at most the loop's trips.
  res = seven[2]
  evals, iters = np.asarray(res.num_evals), np.asarray(res.num_iter)
  assert np.all(evals >= iters + 1 + FAST.num_bisection), (evals, iters)
  assert np.all(evals <= (len(FAST.c_grid) + FAST.num_bisection) * (FAST.maxiter + 31))


@pytest.mark.parametrize("carry", [True, False])
def test_restart_carries_the_step_scale_across_a_hessian_shift(carry):
  # f1 = 0.5 a ||z - b||^2 builds pairs with s.y / y.y = 1 / a. Restarted on f2 = f1 + 0.5 d ||z||^2
  # (Hessian shift d), the first step -g / (a + d) is Newton's: it lands on f2's minimiser at once. Without
  # the shift (NaN) the scale given instead (1 / a) is used, and one step falls short.
  n, a, d = 6, 2.0, 3.0
  b = jnp.linspace(0.2, 0.8, n)[None]

  def fun(z, bb, dd):
    f = 0.5 * a * jnp.sum((z - bb) ** 2) + 0.5 * dd * jnp.sum(z * z)
    return f, f

  rs = solver.row_solver(fun, -10.0, 10.0, solver="projected", maxiter=100, history_size=3, tol=1e-9,
                         ftol=0.0)
  step = jax.jit(rs.step)   # one compile, not one per operation
  st = rs.init(jnp.zeros((1, n)), (b, jnp.zeros((1,))))
  for _ in range(3):
    st = step(st, (b, jnp.zeros((1,))))
  shift = jnp.asarray([d if carry else jnp.nan])
  st = jax.jit(rs.restart)(st, jnp.ones((1,), bool), jnp.zeros((1, n)), shift, jnp.asarray([1.0 / a]))
  args = (b, jnp.full((1,), d))
  st = step(step(st, args), args)       # the start's evaluation, then the first step
  z_star = a * b / (a + d)
  err = float(jnp.max(jnp.abs(st.z - z_star)))
  assert (err < 1e-5) if carry else (err > 1e-2), err


def test_a_success_short_of_the_margin_on_the_batch_is_pushed_out():
  # The batch evaluation (B > 1) gives class 0 0.05 logits less than a row's: the c search's successes
  # toward class 0 (refine=False: returned as found) fall short on the final, batched check, and are moved
  # outward along x -> x_adv (t > 1) until they clear it.
  def skewed_apply(params, x):
    return linear_apply(params, x) - (0.05 if x.shape[0] > 1 else 0.0) * (jnp.arange(K) == 0)[None, :]

  params, x = _linear_params(), _data(8)
  x = x[np.argmax(np.asarray(linear_apply(params, x)), -1) != 0]
  target = np.zeros(len(x), np.int32)
  opts = dataclasses.replace(FAST, refine=False, num_workers=1)
  res = attack.lbfgs_attack(skewed_apply, params, x, target, opts)
  plain = attack.lbfgs_attack(linear_apply, params, x, target, opts)
  assert np.all(np.asarray(res.success)) and np.all(np.asarray(res.t) > 1.0)
  # The same search (rows see the same model), then the push (up to clipping at the box).
  np.testing.assert_allclose(np.asarray(res.distortion), np.asarray(res.t) * np.asarray(plain.distortion),
                             rtol=2e-3)
