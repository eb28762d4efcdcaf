"""Foolbox 3 peers of the attack on the same weights and inputs (``scripts/bench/peers.py``).

Usage (torch and foolbox installed; they are imported inside the functions that need them only, so this
module imports without them and neither is a dependency of the package)::

    net = peers.torch_mlp(variables)                 # torch copy of a models.SigmoidMLP (FC100-100-10 etc.)
    x_adv, seconds = peers.run_foolbox(net, x, target, "ddn", steps=1000)
    ok, rms = peers.rescore(model.apply, variables, x, target, x_adv)   # judged by the JAX model

Methods (``METHODS``): "ddn" (``foolbox.attacks.DDNAttack``), "fmn" (``L2FMNAttack``), "cw"
(``L2CarliniWagnerAttack``), each targeted (``TargetedMisclassification``), bounds (0, 1), minimisation
mode (``epsilons=None``). Every output, ours included, is re-scored with :func:`rescore`: the same success
rule (the target wins by ``success_margin`` logits in the JAX model, inside the box) and the same RMS
distortion for all. Foolbox's own success test is an argmax; a peer's point that its attack counts as a
success can still fail the margin (its figures give both, ``success`` and ``success_argmax``).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import data, models, train
from intriguing_jax.attack import bench
from intriguing_jax.attack.engine import AttackOptions, lbfgs_attack
from intriguing_jax.attack.perturbations import random_targets

# method -> (class in foolbox.attacks, keyword arguments a config may set)
METHODS = {
    "ddn": ("DDNAttack", ("init_epsilon", "steps", "gamma")),
    "fmn": ("L2FMNAttack", ("steps", "max_stepsize", "min_stepsize", "gamma")),
    "cw": ("L2CarliniWagnerAttack", ("binary_search_steps", "steps", "stepsize", "confidence",
                                     "initial_const", "abort_early")),
}
WARMUP_EXAMPLES = 8    # images of the untimed warm-up call before each peer's timed call
LOGIT_TOLERANCE = 1e-4  # max |torch logits - JAX logits| accepted by ``run``


def _plain(d: Any) -> Dict[str, Any]:
  """A ConfigDict or mapping as a plain dict."""
  return d.to_dict() if hasattr(d, "to_dict") else dict(d)


def _check_peer(name: str, spec: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
  """(method, keyword arguments) of a ``config.peers`` entry; ValueError naming what is wrong."""
  spec = dict(spec)
  method = spec.pop("method", None)
  if method not in METHODS:
    raise ValueError(f"bench_peers config: peer {name!r}: unknown method {method!r} (known: "
                     f"{', '.join(METHODS)})")
  bad = sorted(set(spec) - set(METHODS[method][1]))
  if bad:
    raise ValueError(f"bench_peers config: peer {name!r}: {method} takes no {bad} (it takes "
                     f"{', '.join(METHODS[method][1])})")
  return method, spec


def validate(config) -> None:
  """Raises ValueError (naming the entry) unless ``config`` (configs/bench_peers.py) can run: a
  ``models.SigmoidMLP`` model, ``num_examples`` and ``repeats`` >= 1, ``repeat_below_s`` >= 0, at least
  one budget, every budget valid ``AttackOptions`` overrides, every peer a known method with keyword
  arguments it takes."""
  if not isinstance(models.get_model(config.model), models.SigmoidMLP):
    raise ValueError(f"bench_peers config: model {config.model!r} is not a SigmoidMLP (fc...)")
  if min(config.num_examples, config.repeats) < 1:
    raise ValueError("bench_peers config: num_examples and repeats must be >= 1")
  if not config.repeat_below_s >= 0:
    raise ValueError(f"bench_peers config: repeat_below_s must be >= 0, got {config.repeat_below_s}")
  if not config.budgets:
    raise ValueError("bench_peers config: budgets is empty (one is the reference)")
  for name, overrides in config.budgets.items():
    try:
      AttackOptions(**_plain(overrides))
    except (TypeError, ValueError) as e:
      raise ValueError(f"bench_peers config: budget {name!r}: {e}") from e
  for name, spec in config.peers.items():
    _check_peer(name, _plain(spec))


def torch_mlp(variables) -> Any:
  """A float32 torch ``nn.Sequential`` computing the logits of the ``models.SigmoidMLP`` whose variables
  are given: Flatten, then Linear + Sigmoid for each ``hidden_<i>`` layer and a Linear ``output`` (torch
  weight = Flax kernel [in, out] transposed). It takes the same inputs, [B, H, W, C] (flattened in the same
  row-major order as the Flax model) or [B, D]. Returned in eval mode with ``requires_grad`` off on the
  weights (an attack needs gradients with respect to the input only). ValueError for other parameters.
  """
  import torch  # pylint: disable=g-import-not-at-top  (optional)
  params = variables.get("params", variables)
  hidden = sorted((k for k in params if k.startswith("hidden_")), key=lambda k: int(k.split("_")[1]))
  names = hidden + ["output"]
  if set(params) != set(names) or hidden != [f"hidden_{i}" for i in range(len(hidden))]:
    raise ValueError(f"torch_mlp: not SigmoidMLP parameters (hidden_0.., output): {sorted(params)}")
  layers = [torch.nn.Flatten()]
  for name in names:
    kernel = np.asarray(params[name]["kernel"], np.float32)
    linear = torch.nn.Linear(*kernel.shape)
    with torch.no_grad():
      linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
      linear.bias.copy_(torch.from_numpy(np.array(params[name]["bias"], np.float32)))
    layers += [linear] + ([torch.nn.Sigmoid()] if name != "output" else [])
  net = torch.nn.Sequential(*layers).float().eval()
  net.requires_grad_(False)
  return net


def make_attack(method: str, **kw: Any) -> Any:
  """The Foolbox attack object of ``method`` ("ddn", "fmn" or "cw") with keyword arguments ``kw``."""
  import foolbox  # pylint: disable=g-import-not-at-top  (optional)
  method, kw = _check_peer(method, dict(kw, method=method))
  return getattr(foolbox.attacks, METHODS[method][0])(**kw)


def gradient_evals(method: str, **kw: Any) -> float:
  """Gradient evaluations per example the method spends with ``kw`` (read from the attack object, so
  Foolbox's defaults apply): DDN and FMN, ``steps``; C&W, ``binary_search_steps * steps`` (its budget:
  ``abort_early`` may stop a binary-search step's Adam loop sooner)."""
  attack = make_attack(method, **kw)
  if method == "cw":
    return float(attack.binary_search_steps * attack.steps)
  return float(attack.steps)


def run_foolbox(torch_model, x, target, method: str, **kw: Any) -> Tuple[np.ndarray, float]:
  """One targeted Foolbox 3 attack (:func:`make_attack`) on ``torch_model`` (bounds (0, 1), minimisation
  mode: ``epsilons=None``, no clipping to a budget).

  Args:
    torch_model: a torch module on one device (e.g. :func:`torch_mlp`); put in eval mode.
    x: [B, ...] float inputs in [0, 1] (numpy or any array).
    target: [B] integer target classes.
    method: a key of ``METHODS``.
    **kw: the attack's keyword arguments (``METHODS[method][1]``).

  Returns:
    (x_adv, seconds): the attack's points as a float32 numpy array of x's shape (where it found none, what
    Foolbox returns: x for DDN/FMN, zeros for C&W), and the wall time of the attack call alone.
  """
  import foolbox  # pylint: disable=g-import-not-at-top  (optional)
  import torch  # pylint: disable=g-import-not-at-top  (optional)
  attack = make_attack(method, **kw)
  torch_model.eval()
  device = next(torch_model.parameters()).device
  fmodel = foolbox.PyTorchModel(torch_model, bounds=(0, 1), device=device)
  xt = torch.as_tensor(np.array(x, np.float32), device=device)
  criterion = foolbox.criteria.TargetedMisclassification(
      torch.as_tensor(np.array(target), dtype=torch.long, device=device))
  t0 = time.perf_counter()
  _, x_adv, _ = attack(fmodel, xt, criterion, epsilons=None)
  seconds = time.perf_counter() - t0
  return x_adv.detach().cpu().numpy().astype(np.float32).reshape(np.shape(x)), seconds


def rescore(apply_fn, params, x, target, x_adv, success_margin: float = 1e-3,
            box: Tuple[float, float] = (0.0, 1.0)) -> Tuple[np.ndarray, np.ndarray]:
  """Judges any method's points with the JAX model.

  Args:
    apply_fn, params: the model, ``apply_fn(params, x) -> logits [B, K]``.
    x: [B, ...] the clean inputs.
    target: [B] target classes.
    x_adv: the method's points, x's shape (or the same number of elements).
    success_margin: logits by which the target must beat every other class.
    box: (lower, upper) pixel bounds, checked with a tolerance of 1e-6.

  Returns:
    (success bool [B], distortion float64 [B]): success = every pixel finite and inside the box and
    ``z_target - max_{j != target} z_j > success_margin``; distortion = ``sqrt(mean((x_adv - x)^2))``.
  """
  x = np.asarray(x, np.float32)
  xa = np.asarray(x_adv, np.float32).reshape(x.shape)
  t = np.asarray(target).astype(np.int64)
  rows = np.arange(len(t))
  logits = np.array(apply_fn(params, jnp.asarray(xa)), np.float64)
  z_target = logits[rows, t]
  logits[rows, t] = -np.inf
  flat = xa.reshape(len(xa), -1)
  in_box = np.all(np.isfinite(flat) & (flat >= box[0] - 1e-6) & (flat <= box[1] + 1e-6), axis=1)
  success = in_box & (z_target - logits.max(axis=1) > success_margin)
  diff = flat.astype(np.float64) - x.reshape(len(x), -1).astype(np.float64)
  return success, np.sqrt(np.mean(np.square(diff), axis=1))


def _mean(v: np.ndarray) -> float:
  return float(np.mean(v)) if len(v) else float("nan")


def run(config, workdir: str, data_dir=None) -> Dict[str, Any]:
  """Our attack under every ``config.budgets`` entry and every Foolbox ``config.peers`` entry on the same
  model and inputs (module docstring); prints one table line per method; returns the figures.

  The config is validated (:func:`validate`) before any data is read. Inputs: the first
  ``config.num_examples`` correctly classified MNIST test images, targets ``random_targets(PRNGKey(seed))``.
  The model is ``train.get_or_train(config.model)`` in ``workdir``; its torch copy must reproduce the JAX
  logits to ``LOGIT_TOLERANCE`` (RuntimeError otherwise). Timing: the median of ``config.repeats`` timed
  calls, taken in rounds (each round times every method once, so that a drift in the machine's speed
  touches all alike): ours after an untimed first call (compile), a peer after an untimed warm-up on
  ``WARMUP_EXAMPLES`` images; a peer whose first timed call takes longer than ``config.repeat_below_s``
  seconds is timed once.
  Per method: success (:func:`rescore`), mean RMS over its successes, the ratio of the reference budget's
  (``bench.reference_budget``) mean RMS to the method's on the examples where both succeeded, gradient
  evaluations per example (ours: the c search's ``evals_per_example``, the refinement's fixed forward
  passes and Jacobians given apart), and the Pareto front of (seconds per example, mean RMS).
  """
  validate(config)
  try:
    import foolbox  # pylint: disable=g-import-not-at-top  (optional)
    import torch  # pylint: disable=g-import-not-at-top  (optional)
  except ImportError as e:
    raise ImportError(f"bench_peers needs torch and foolbox, which live in an optional environment "
                      f"(scripts/bench/peers.py says how to make it): {e}") from e
  model, variables, x, target = _inputs(config, workdir, data_dir)
  net, logit_diff = _checked_torch_copy(model, variables, x)
  n = len(x)
  print(f"[peers] {config.model}, first {n} correctly classified test images, random targets (seed "
        f"{config.seed}); torch {torch.__version__} ({torch.get_num_threads()} threads), foolbox "
        f"{foolbox.__version__}; torch vs JAX logits max |diff| {logit_diff:.1e}")
  methods, outputs, timers = {}, {}, {}
  _run_ours(config, model, variables, x, target, methods, outputs, timers)
  _run_peers(config, net, x, target, methods, outputs, timers)
  _time_in_rounds(config.repeats - 1, n, methods, timers)
  ref = bench.reference_budget(config.budgets)
  _score(model, variables, x, target, outputs, methods, ref)
  front = bench.pareto([(k, v["s_per_example"], v["mean_rms"]) for k, v in methods.items()])
  for name, f in methods.items():
    f["pareto"] = name in front
  _print_table(methods, ref, config)
  return dict(model=config.model, n=n, seed=config.seed, reference=ref, methods=methods, pareto_front=front,
              logit_max_abs_diff=logit_diff, torch=torch.__version__, foolbox=foolbox.__version__,
              torch_num_threads=torch.get_num_threads(), jax=jax.__version__,
              devices=[str(d) for d in jax.devices()])


def _inputs(config, workdir: str, data_dir) -> Tuple[Any, Any, np.ndarray, np.ndarray]:
  """The model (trained or restored in workdir), the first ``num_examples`` correctly classified test
  images and their seeded random targets."""
  x_train, y_train = data.load_mnist("train", data_dir)
  x_test, y_test = data.load_mnist("test", data_dir)
  model, variables = train.get_or_train(config.model, x_train, y_train, workdir=workdir)
  pred = np.asarray(jnp.argmax(model.apply(variables, jnp.asarray(x_test)), axis=-1))
  idx = np.flatnonzero(pred == np.asarray(y_test))[:config.num_examples]
  if len(idx) < config.num_examples:
    raise ValueError(f"bench_peers: only {len(idx)} correctly classified test images")
  x, labels = np.asarray(x_test[idx], np.float32), np.asarray(y_test[idx])
  return model, variables, x, np.asarray(random_targets(jax.random.PRNGKey(config.seed), labels))


def _checked_torch_copy(model, variables, x: np.ndarray) -> Tuple[Any, float]:
  """The torch copy of the model and its largest logit difference on x (RuntimeError past the tolerance)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional)
  net = torch_mlp(variables)
  with torch.no_grad():
    logits_torch = net(torch.from_numpy(x)).numpy()
  logit_diff = float(np.max(np.abs(logits_torch - np.asarray(model.apply(variables, x)))))
  if not logit_diff <= LOGIT_TOLERANCE:
    raise RuntimeError(f"bench_peers: the torch copy's logits differ from the JAX model's by "
                       f"{logit_diff:.2e} (> {LOGIT_TOLERANCE})")
  return net, logit_diff


def _run_ours(config, model, variables, x, target, methods: Dict[str, Any], outputs: Dict[str, Any],
              timers: Dict[str, Any]) -> None:
  """Our attack under every budget: a first call (compile) and one timed call; evaluations into methods,
  points into outputs, a timer of one more call into timers."""
  for name, overrides in config.budgets.items():
    opts = AttackOptions(**_plain(overrides))
    m = bench.measure(model.apply, variables, x, target, opts, 1)
    outputs[name] = m["x_adv"]
    methods[name] = dict(kind="ours", options=_plain(overrides), times_s=[m["s_per_example"] * len(x)],
                         time_first_s=m["time_first_s"],
                         engine_success=m["success"], grad_evals_per_example=m["evals_per_example"],
                         refinement_evals=m["refinement_evals"])
    run = functools.partial(lbfgs_attack, model.apply, variables, x, target, opts)
    timers[name] = lambda run=run: bench.timed(run)[1]


def _run_peers(config, net, x, target, methods: Dict[str, Any], outputs: Dict[str, Any],
               timers: Dict[str, Any]) -> None:
  """Every Foolbox peer: a warm-up on ``WARMUP_EXAMPLES`` images, one timed call; a timer of one more call
  into timers if that call took at most ``config.repeat_below_s`` seconds."""
  for name, spec in config.peers.items():
    method, kw = _check_peer(name, _plain(spec))
    warm = min(WARMUP_EXAMPLES, len(x))
    run_foolbox(net, x[:warm], target[:warm], method, **kw)
    outputs[name], seconds = run_foolbox(net, x, target, method, **kw)
    methods[name] = dict(kind="foolbox", method=method, kwargs=kw, times_s=[seconds],
                         grad_evals_per_example=gradient_evals(method, **kw))
    if seconds <= config.repeat_below_s:
      timers[name] = lambda method=method, kw=kw: run_foolbox(net, x, target, method, **kw)[1]


def _time_in_rounds(rounds: int, n: int, methods: Dict[str, Any], timers: Dict[str, Any]) -> None:
  """``rounds`` more timed calls of every method with a timer, one of each per round; then each method's
  time per example from the median of its timed calls."""
  for name, times in bench.in_rounds(timers, rounds).items():
    methods[name]["times_s"].extend(map(float, times))
  for f in methods.values():
    t = float(np.median(f["times_s"]))
    f.update(s_per_example=t / n, examples_per_s=n / t, timed_calls=len(f["times_s"]))


def _score(model, variables, x, target, outputs, methods: Dict[str, Any], ref: str) -> None:
  """Re-scores every method's points with the JAX model; the distortion ratio to the reference budget's."""
  masks = {}
  for name, f in methods.items():
    ok, d = rescore(model.apply, variables, x, target, outputs[name])
    ok_argmax, _ = rescore(model.apply, variables, x, target, outputs[name], success_margin=0.0)
    masks[name] = (ok, d)
    f.update(success=float(ok.mean()), success_argmax=float(ok_argmax.mean()), mean_rms=_mean(d[ok]))
  ref_ok, ref_d = masks[ref]
  for name, f in methods.items():
    both = ref_ok & masks[name][0]
    f.update(rms_ratio_vs_reference=_mean(ref_d[both]) / _mean(masks[name][1][both]), n_both=int(both.sum()))


def _print_table(methods: Dict[str, Any], ref: str, config) -> None:
  print(f"[peers] success: the target wins by > 1e-3 logits in the JAX model, inside [0, 1]; mean RMS over "
        f"each method's successes; ratio: {ref}'s mean RMS / the method's on the examples both solved; "
        f"time: the median of {config.repeats} timed calls in rounds (a peer slower than "
        f"{config.repeat_below_s:g} s: one), after a first call / warm-up")
  print(f"{'method':22s} {'s/example':>10s} {'examples/s':>10s} {'success':>8s} {'mean RMS':>9s} "
        f"{'ratio':>16s} {'grad evals/ex':>13s}  Pareto")
  for name, f in methods.items():
    extra = ""
    if f["kind"] == "ours" and f["refinement_evals"]["jacobians"]:
      extra = (f"  (+ refinement {f['refinement_evals']['forward']} forward, "
               f"{f['refinement_evals']['jacobians']} Jacobians)")
    ratio = f"{f['rms_ratio_vs_reference']:.4f} (on {f['n_both']})"
    print(f"{name:22s} {f['s_per_example']:10.5f} {f['examples_per_s']:10.1f} {f['success']:8.1%} "
          f"{f['mean_rms']:9.5f} {ratio:>16s} {f['grad_evals_per_example']:13.1f}  "
          f"{'yes' if f['pareto'] else 'no':6s}{extra}")
