"""Tests of intriguing_jax.attack on tiny synthetic models (a few seconds of compile each on 2 CPU cores)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import dot_precisions
from intriguing_jax import attack, exact

M, K = 24, 4  # input dimension and classes of the synthetic problems
# Cheaper options than the defaults, same algorithm (keeps the test file well under a minute).
FAST = dict(c_grid=(0.01, 0.1, 1.0, 10.0), num_bisection=8, maxiter=60, projection_steps=300)


def linear_apply(params, x):
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
  rng = np.random.RandomState(seed)
  x = rng.uniform(0.0, 1.0, size=(b, M)).astype(np.float32)
  return x


def _targets(logits_fn, x, seed=2):
  """Random wrong labels for the linear model (every class reachable); the runner-up class otherwise."""
  logits = np.asarray(logits_fn(jnp.asarray(x)))
  pred = np.argmax(logits, -1)
  if seed is None:
    return np.argsort(logits, -1)[:, -2].astype(np.int32), pred
  rng = np.random.RandomState(seed)
  return ((pred + rng.randint(1, K, size=pred.shape)) % K).astype(np.int32), pred


@pytest.mark.parametrize("schedule", ["continuous", "rounds"])
def test_linear_matches_exact_optimum_and_success_is_real(schedule):
  params = _linear_params()
  x = _data(6)
  target, _ = _targets(lambda z: linear_apply(params, z), x)
  res = attack.lbfgs_attack(linear_apply, x, target, params=params, schedule=schedule, **FAST)
  xa = np.asarray(res.x_adv)
  assert xa.min() >= 0.0 and xa.max() <= 1.0
  t = np.asarray(res.t)
  assert np.all((t >= 0) & (t <= 1))
  sol = exact.linear_min_norm(params["kernel"], params["bias"], x, target)
  assert np.all(sol.feasible)
  # Re-evaluate the model ourselves: success means the target really wins.
  pred = np.asarray(jnp.argmax(linear_apply(params, res.x_adv), -1))
  np.testing.assert_array_equal(np.asarray(res.success), pred == target)
  assert np.all(np.asarray(res.success))
  d = np.asarray(res.distortion)
  # Never below the certified lower bound (weak duality): a success point is feasible for the QP.
  assert np.all(d >= sol.lower_bound * (1 - 1e-5) - 1e-7)
  # Within 1% of the exact optimum per example (float32 engine vs float64 QP).
  np.testing.assert_allclose(d, sol.distortion, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(res.distortion),
                             np.sqrt(np.mean((np.asarray(res.x_adv) - x) ** 2, axis=1)), rtol=1e-5)


@pytest.fixture(scope="module")
def mlp_batch():
  """One attack of a sigmoid MLP on a batch of 6, shared by the tests below (one compiled program)."""
  params = _mlp_params(1)
  x = _data(6, seed=5)
  target, _ = _targets(lambda z: mlp_apply(params, z), x, seed=None)
  return params, x, target, attack.lbfgs_attack(mlp_apply, x, target, params=params, **FAST)


def _target_margin(logits, target):
  logits = np.array(logits, np.float64)
  own = logits[np.arange(len(target)), target]
  logits[np.arange(len(target)), target] = -np.inf
  return own - logits.max(axis=1)


def test_success_margin_clears_the_threshold(mlp_batch):
  # The refinement walks toward the decision boundary; it must stop clearly above the success threshold
  # (it used to stop at exactly success_margin = 1e-3, so flags flipped with the batch shape or device count).
  params, x, target, res = mlp_batch
  assert np.all(np.asarray(res.success))
  assert np.any(np.asarray(res.t) < 1.0)  # the refinement did move points toward the boundary
  xb = np.asarray(res.x_adv)
  batched = _target_margin(mlp_apply(params, jnp.asarray(xb)), target)
  single = np.concatenate([_target_margin(mlp_apply(params, jnp.asarray(xb[i:i + 1])), target[i:i + 1])
                           for i in range(len(target))])
  # float32 re-evaluation noise is ~1e-6 logits; the gap to the threshold must be far larger.
  assert np.all(batched > 1e-3 + 1e-4), batched
  assert np.all(single > 1e-3 + 1e-4), single


def test_no_grid_success_extends_the_c_search_downward():
  # Every grid value is far too large to reach the target: the c search must walk below the grid.
  params = _linear_params()
  x = _data(6)
  target, _ = _targets(lambda z: linear_apply(params, z), x)
  opts = dict(FAST, c_grid=(1e4,), num_bisection=8)
  res = attack.lbfgs_attack(linear_apply, x, target, params=params, **opts)
  assert np.all(np.asarray(res.success))
  c = np.asarray(res.c)
  assert np.all(c < 1e4) and np.all(np.isfinite(c))


def test_batch_equals_per_example(mlp_batch):
  params, x, target, batch = mlp_batch
  assert np.all(np.asarray(batch.success))
  for i in range(x.shape[0]):
    one = attack.lbfgs_attack(mlp_apply, x[i:i + 1], target[i:i + 1], params=params, **FAST)
    assert bool(one.success[0]) == bool(batch.success[i])
    # Not bitwise: XLA's CPU GEMMs round differently for [6*G, m] and [G, m] operands, and the iterative
    # solver on a sigmoid MLP amplifies that to ~2e-4 per pixel (measured); distortions agree to 1e-3.
    np.testing.assert_allclose(np.asarray(one.x_adv[0]), np.asarray(batch.x_adv[i]), atol=2e-3)
    np.testing.assert_allclose(float(one.distortion[0]), float(batch.distortion[i]), rtol=1e-3, atol=1e-6)


def test_queue_of_examples_matches_one_row_per_example(mlp_batch):
  # Two rows working through a queue of six examples: every example gets the same c search as with one
  # row each (up to float32 rounding of the differently shaped batches).
  params, x, target, batch = mlp_batch
  queued = attack.lbfgs_attack(mlp_apply, x, target, params=params, num_slots=2, **FAST)
  np.testing.assert_array_equal(np.asarray(queued.success), np.asarray(batch.success))
  np.testing.assert_allclose(np.asarray(queued.distortion), np.asarray(batch.distortion), rtol=1e-3)
  np.testing.assert_allclose(np.asarray(queued.c), np.asarray(batch.c), rtol=1e-3)
  # Example i's result landed in row i (not in the row of whichever example finished with it).
  pred = np.asarray(jnp.argmax(mlp_apply(params, queued.x_adv), -1))
  np.testing.assert_array_equal(pred, target)


def test_continuous_and_rounds_schedules_agree(mlp_batch):
  # The two schedules visit c differently (first success from the top vs the whole grid), but both find
  # the largest succeeding c and refine to the boundary: same successes, distortions within 2%.
  params, x, target, batch = mlp_batch
  rounds = attack.lbfgs_attack(mlp_apply, x, target, params=params, schedule="rounds", **FAST)
  np.testing.assert_array_equal(np.asarray(rounds.success), np.asarray(batch.success))
  np.testing.assert_allclose(np.asarray(batch.distortion), np.asarray(rounds.distortion), rtol=2e-2)


def test_rows_step_solves_box_quadratics_with_restarts():
  # Three box-constrained convex quadratics 0.5 (z-a)' Q_r (z-a), solved by the batched stepper; row 1
  # is restarted half-way from a different point and must still reach its optimum (scipy's).
  from scipy import optimize
  from intriguing_jax.attack import solver
  rng = np.random.RandomState(0)
  n, r = 10, 3
  a = rng.uniform(-0.5, 1.5, size=(r, n)).astype(np.float32)
  b = rng.randn(r, n, n).astype(np.float32)
  q = np.einsum("rij,rkj->rik", b, b) / n + 0.1 * np.eye(n, dtype=np.float32)

  def vg(z):
    fun = lambda z1, a1, q1: 0.5 * (z1 - a1) @ q1 @ (z1 - a1)
    f, g = jax.vmap(jax.value_and_grad(fun))(z, jnp.asarray(a), jnp.asarray(q))
    return (f, f), g

  @jax.jit
  def run():
    st = solver.rows_init(jnp.full((r, n), 0.5), jnp.zeros((r,)), 5)
    step = lambda _, st: solver.rows_step(st, vg, 0.0, 1.0, maxiter=200, tol=1e-6, ftol=0.0)
    st = jax.lax.fori_loop(0, 15, step, st)
    st = solver.rows_restart(st, jnp.asarray([False, True, False]), jnp.zeros((r, n)))
    restarted_iter = st.num_iter
    st = jax.lax.fori_loop(0, 300, step, st)
    return st, restarted_iter

  st, restarted_iter = run()
  assert int(restarted_iter[1]) == 0 and int(restarted_iter[0]) > 0
  assert np.all(np.asarray(st.done))
  for i in range(r):
    ref = optimize.minimize(lambda z: 0.5 * (z - a[i]) @ q[i] @ (z - a[i]), np.full(n, 0.5),
                            jac=lambda z: q[i] @ (z - a[i]), method="L-BFGS-B", bounds=[(0, 1)] * n,
                            options=dict(ftol=1e-15, gtol=1e-10))
    np.testing.assert_allclose(np.asarray(st.z[i]), ref.x, atol=2e-4)


def test_make_attack_runs_inside_jit_and_matches_lbfgs_attack(mlp_batch):
  params, x, target, batch = mlp_batch
  attack_fn = attack.make_attack(mlp_apply, **FAST)

  @jax.jit
  def inside(p, xb, tb):  # e.g. a training step that attacks its own batch
    res = attack_fn(p, xb, tb)
    return res.success, res.distortion

  success, dist = inside(params, jnp.asarray(x), jnp.asarray(target))
  np.testing.assert_array_equal(np.asarray(success), np.asarray(batch.success))
  np.testing.assert_allclose(np.asarray(dist), np.asarray(batch.distortion), rtol=1e-4)
  with pytest.raises(ValueError, match="maxiter"):
    attack.make_attack(mlp_apply, maxiter=0)


def test_untargeted_in_a_custom_box():
  params = _mlp_params(2)
  x = 0.25 + 0.5 * _data(6, seed=6)
  labels = np.asarray(jnp.argmax(mlp_apply(params, jnp.asarray(x)), -1)).astype(np.int32)
  res = attack.lbfgs_attack(mlp_apply, x, labels, params=params, untargeted=True, box=(0.25, 0.75), **FAST)
  xa = np.asarray(res.x_adv)
  assert xa.min() >= 0.25 and xa.max() <= 0.75
  pred = np.asarray(jnp.argmax(mlp_apply(params, res.x_adv), -1))
  assert np.all(np.asarray(res.success))
  np.testing.assert_array_equal(np.asarray(res.pred), pred)
  assert np.all(pred != labels)

def test_closure_logits_fn_and_penalty_options():
  params = _linear_params()
  fn = lambda z: linear_apply(params, z)
  x = _data(6)
  target, _ = _targets(fn, x)
  # Also the accelerator layout of the c grid (one vmap over examples x c), forced here on CPU.
  res = attack.lbfgs_attack(fn, x, target, penalty="l2", loss="margin", schedule="rounds",
                            grid_parallel=True, **FAST)
  pred = np.asarray(jnp.argmax(fn(res.x_adv), -1))
  assert np.all(np.asarray(res.success))
  np.testing.assert_array_equal(pred, target)


@pytest.mark.parametrize("bad, match", [
    (dict(x_nan=True), "NaN"),
    (dict(x_scale=2.0), "outside the box"),
    (dict(target_value=K), "target values"),
    (dict(target_value=-1), "target values"),
    (dict(target_len=3), "target must have shape"),
    (dict(x_1d=True), "x must be"),
    (dict(options=dict(maxiter=0)), "maxiter"),
    (dict(options=dict(c_grid=())), "c_grid"),
    (dict(options=dict(penalty="l1")), "penalty"),
    (dict(options=dict(box=(1.0, 0.0))), "box"),
    (dict(options=dict(schedule="async")), "schedule"),
    (dict(options=dict(schedule="continuous", solver="jaxopt")), "schedule='rounds'"),
    (dict(options=dict(num_slots=-1)), "num_slots"),
    (dict(options=dict(precision="fastest")), "precision"),
])
def test_bad_input_raises_before_compiling(bad, match):
  params = _linear_params()
  x = _data(4)
  target = np.zeros(4, np.int32)
  if bad.get("x_nan"):
    x = x.copy()
    x[1, 3] = np.nan
  if "x_scale" in bad:
    x = x * bad["x_scale"]
  if "target_value" in bad:
    target = np.full(4, bad["target_value"], np.int32)
  if "target_len" in bad:
    target = np.zeros(bad["target_len"], np.int32)
  if bad.get("x_1d"):
    x = x[0]
  before = attack._compiled.cache_info().currsize  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=match):
    attack.lbfgs_attack(linear_apply, x, target, params=params, **bad.get("options", {}))
  assert attack._compiled.cache_info().currsize == before  # pylint: disable=protected-access


@pytest.mark.parametrize("precision, expected", [("highest", jax.lax.Precision.HIGHEST),
                                                 ("tensorfloat32", jax.lax.Precision.HIGH),
                                                 (None, jax.lax.Precision.DEFAULT)])
def test_precision_option_reaches_every_matmul(precision, expected):
  # On a GPU the ambient float32 matmul is TF32, whose logit error reaches the success margin; the attack
  # traces its whole program (solves, refinement, success check) under `precision`. None keeps the ambient
  # setting, here "default".
  params = _mlp_params(1)
  fn = attack.make_attack(mlp_apply, maxiter=3, c_grid=(1.0,), num_bisection=1, precision=precision)
  with jax.default_matmul_precision("default"):
    jaxpr = jax.make_jaxpr(fn)(params, jnp.asarray(_data(2)), jnp.zeros(2, jnp.int32))
  precisions = dot_precisions(jaxpr.jaxpr)
  assert len(precisions) > 3, precisions
  assert all(p == (expected, expected) for p in precisions), precisions


def test_logits_fn_with_wrong_output_shape():
  with pytest.raises(ValueError, match="num_classes"):
    attack.lbfgs_attack(lambda z: jnp.sum(z, axis=1), _data(2), np.zeros(2, np.int32))


def test_no_retrace_on_new_data_or_new_params():
  traces = []

  def counted(params, x):
    traces.append(1)
    return linear_apply(params, x)

  opts = FAST
  x1, x2 = _data(6, seed=7), _data(6, seed=8)
  p1, p2 = _linear_params(0), _linear_params(1)
  t1, _ = _targets(lambda z: linear_apply(p1, z), x1)
  t2, _ = _targets(lambda z: linear_apply(p2, z), x2)
  jax.block_until_ready(attack.lbfgs_attack(counted, x1, t1, params=p1, **opts))
  n = len(traces)
  assert n > 0
  res = attack.lbfgs_attack(counted, x2, t2, params=p2, **opts)
  jax.block_until_ready(res)
  assert len(traces) == n, "second call with new data and new params re-traced the model"
  assert np.all(np.asarray(res.success))


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
  # The direction is kept.
  cos = jnp.sum((scaled - x) * (x_adv - x), 1) / (
      jnp.linalg.norm(scaled - x, axis=1) * jnp.linalg.norm(x_adv - x, axis=1))
  np.testing.assert_allclose(np.asarray(cos), 1.0, rtol=1e-5)
  # A zero perturbation stays zero.
  np.testing.assert_array_equal(np.asarray(attack.scale_perturbation(x, x, 0.1)), np.asarray(x))
  with pytest.raises(ValueError, match="stddev"):
    attack.gaussian_noise(jax.random.PRNGKey(0), x, -1.0)


def test_random_targets_never_equal_labels():
  labels = jnp.arange(1000) % 10
  t = attack.random_targets(jax.random.PRNGKey(0), labels)
  assert np.all(np.asarray(t) != np.asarray(labels))
  assert set(np.asarray(t).tolist()) == set(range(10))


def test_box_lbfgs_quadratic_bowl():
  # The box optimum of a separable quadratic is the clipped unconstrained optimum (jaxopt's test).
  centre = jnp.asarray(np.linspace(-1.0, 2.0, 12).astype(np.float32))
  fun = lambda z: jnp.sum((z - centre) ** 2 * jnp.arange(1, 13))
  # jaxopt's line search stalls slightly earlier in float32 (notes/attack.md), hence its looser atol.
  for solver, atol in (("projected", 1e-5), ("jaxopt", 1e-3)):
    z, _ = jax.jit(lambda: attack.box_lbfgs(fun, jnp.full(12, 0.5), 0.0, 1.0, maxiter=100,
                                            history_size=10, tol=1e-6, solver=solver))()
    np.testing.assert_allclose(np.asarray(z), np.clip(np.asarray(centre), 0, 1), atol=atol)


def test_sharded_batch_matches_single_device():
  """Runs in a subprocess with 4 fake CPU devices; a ragged batch of 6 is padded to 8 and cut back."""
  code = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.device_count() == 4, jax.devices()
    from tests import test_attack as t
    from intriguing_jax import attack
    p = t._mlp_params(1)
    x = t._data(6, seed=9)
    tgt, _ = t._targets(lambda z: t.mlp_apply(p, z), x, seed=None)
    opts = t.FAST
    a = attack.lbfgs_attack(t.mlp_apply, x, tgt, params=p, **opts)
    b = attack.lbfgs_attack(t.mlp_apply, x, tgt, params=p, shard=False, **opts)
    assert a.x_adv.shape == x.shape, a.x_adv.shape
    assert len(a.x_adv.sharding.device_set) == 4 or a.x_adv.shape[0] == 6
    np.testing.assert_array_equal(np.asarray(a.success), np.asarray(b.success))
    np.testing.assert_allclose(np.asarray(a.x_adv), np.asarray(b.x_adv), atol=2e-4)
    print("OK", np.asarray(a.success).sum())
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests"),
                                                      os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu")  # the 4 forced devices are CPU devices, also on a GPU host
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK" in out.stdout
