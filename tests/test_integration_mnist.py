"""The real attack on real trained MNIST models, checked against the paper's Tables 1 and 2.

FC10(1e-4) and FC10(1e-2) are trained with their full recipes on the real training set (a few seconds each:
softmax regression), then 50 training images are attacked towards seeded random targets, as in Table 1.
Skipped with a reason when the real MNIST files are absent.
"""

import jax
import numpy as np
import pytest

from intriguing_jax import attack
from intriguing_jax import data
from intriguing_jax import metrics
from intriguing_jax import tables
from intriguing_jax import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NUM = 50
_MEANS = {}


@pytest.fixture(scope="module")
def fc10_models(mnist_dir, tmp_path_factory):
  x, y = data.load_mnist("train", data_dir=str(mnist_dir))
  workdir = str(tmp_path_factory.mktemp("models"))
  out = {name: train.get_or_train(name, x, y, workdir=workdir) for name in ("fc10-1e-4", "fc10-1e-2")}
  targets = np.asarray(attack.random_targets(jax.random.PRNGKey(0), y[:NUM]))
  return out, x[:NUM], y[:NUM], targets


@pytest.mark.parametrize("refine, band", [(True, (0.045, 0.07)), (False, (0.045, 0.075))])
def test_real_attack_on_fc10_matches_table1(fc10_models, refine, band):
  """Table 1: FC10(1e-4), av. min. distortion 0.062 in the paper, 0.057 in our full run (60,000 images)."""
  models, x, _, targets = fc10_models
  model, variables = models["fc10-1e-4"]
  res = attack.lbfgs_attack(model.apply, variables, x, targets, attack.AttackOptions(refine=refine))
  assert np.all(np.asarray(res.success))
  # Success is real: the model itself classifies every adversarial image as its target.
  np.testing.assert_array_equal(metrics.predict(model.apply, variables, np.asarray(res.x_adv)), targets)
  assert np.all((np.asarray(res.x_adv) >= 0) & (np.asarray(res.x_adv) <= 1))  # inside the box
  mean = float(np.mean(res.distortion))
  assert band[0] <= mean <= band[1], mean
  _MEANS[refine] = mean
  if len(_MEANS) == 2:  # the refinement moves every success back toward x: never a larger mean distortion
    assert _MEANS[True] < _MEANS[False], _MEANS


def test_examples_of_fc10_1e2_fool_fc10_1e4_far_more_than_noise(fc10_models):
  """Table 2, row FC10(1e-2), column FC10(1e-4): 87.1 % in the paper (88.6 % in our full run), against
  5 % for Gaussian noise of stddev 0.1 (its noise row)."""
  models, x, y, targets = fc10_models
  (src, src_v), (dst, dst_v) = models["fc10-1e-2"], models["fc10-1e-4"]
  res = attack.lbfgs_attack(src.apply, src_v, x, targets)
  adversarial = metrics.error_rate(dst.apply, dst_v, np.asarray(res.x_adv), y)
  noise = metrics.error_rate(dst.apply, dst_v, tables.noisy(0, 0, x, 0.1), y)
  clean = metrics.error_rate(dst.apply, dst_v, x, y)
  assert adversarial >= 0.6 and adversarial >= noise + 0.4, (adversarial, noise, clean)


def test_jaxopt_rows_do_not_depend_on_the_batch(fc10_models):
  """solver="jaxopt": each row of a batch takes the steps it takes alone. jaxopt 0.8.5's LBFGSB ``update``
  under ``vmap`` gave other (even ascent) directions on this model from the second row on."""
  from intriguing_jax.attack import engine, solver   # pylint: disable=g-import-not-at-top
  models, x, _, targets = fc10_models
  model, variables = models["fc10-1e-4"]
  options = attack.AttackOptions(solver="jaxopt")
  fun = engine._objective(model.apply, options, variables, x.shape[1:])   # pylint: disable=protected-access
  rs = solver.row_solver(fun, 0.0, 1.0, solver="jaxopt", maxiter=30, history_size=5, tol=1e-4, ftol=1e-5)
  step = jax.jit(rs.step)

  def solve(rows):
    z0 = x[rows].reshape(len(rows), -1)
    args = (z0, targets[rows], np.ones(len(rows), np.float32))
    st = rs.restart(rs.init(z0, args), np.ones(len(rows), bool), z0)
    for _ in range(4):
      st = step(st, args)
    return np.asarray(st.z)

  together = solve(np.arange(8))
  alone = np.concatenate([solve(np.array([i])) for i in range(8)])
  np.testing.assert_allclose(together, alone, atol=1e-5)


def test_jaxopt_solver_reaches_the_default_solvers_distortion(fc10_models):
  """solver="jaxopt" (the paper's method alone, refine=False) lands within 3 % of the default solver's mean
  distortion on the examples both solve, and solves at least 90 %. Before its failed line searches restarted
  the memory (as scipy's) and its steps stayed in the box it was 6.6 % above (session 15)."""
  models, x, _, targets = fc10_models
  model, variables = models["fc10-1e-4"]
  res = {s: attack.lbfgs_attack(model.apply, variables, x, targets,
                                attack.AttackOptions(solver=s, refine=False)) for s in ("projected", "jaxopt")}
  ok = np.asarray(res["projected"].success) & np.asarray(res["jaxopt"].success)
  assert np.asarray(res["jaxopt"].success).mean() >= 0.9
  mean = {s: np.mean(np.asarray(r.distortion)[ok]) for s, r in res.items()}
  assert mean["jaxopt"] <= 1.03 * mean["projected"], mean
