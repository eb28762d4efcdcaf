r"""Weight decay vs dropout vs adversarial pools vs Lipschitz penalties (``scripts/adversarial_training.py``,
``adversarial_training.run_experiment``).

Presets, chosen with ``--config=intriguing_jax/configs/adversarial_training.py:<preset>``:

* (none): the setting chosen on a 50000 / 10000 validation split (notes/adversarial_training.md):
  FC100-100-10, 150 epochs of Adam 1e-2 (cosine), dropout 0.1 (hidden) / 0.05 (pixels) for the dropout and
  the adversarial runs; one input pool of 640 examples, 16 of them replaced every 4 steps by untargeted
  L-BFGS examples (10 iterations) placed along the attack's direction at RMS 0.035; 10 % of each batch from
  the pool; 100 test images attacked per model; Lipschitz runs: weight decay + μ Σ_l log σ_l (σ_l the
  exact operator norm of weight layer l, so μ times the log of the product of the layer bounds) for each μ
  of ``lipschitz.strengths``.
* ``conv``: the same comparison on the MNIST ConvNet (``models.MnistConvNet``), shortened to fit 2 CPU
  cores (a 3-seed sweep step took ~1 s there, 79 s per epoch): the first 10000 training images, 2 epochs
  of Adam 1e-3 (cosine), λ = 1e-5, dropout 0.5 before the last layer, the pool (input layer, through the
  ConvNet) from half an epoch on, 50 attacked test images.
* ``smoke``: 2000 training images, 2 epochs, a pool of 200 refreshed every 5 steps, 20 attacked images.
* ``paper``: the earlier paper-like setting (no dropout in the adversarial run, pools on the input and both
  hidden layers at the decision boundary, 40 epochs at lr 1e-3); 1.9-3.3 % test error.

Fields: ``model``; ``seed`` (init, batch order, attacked images); ``sweep_seeds`` (several seeds: one vmapped
program per run, batch order of ``seed``); ``runs`` (a subset of weight_decay, dropout, adversarial,
lipschitz; runs finished in the workdir by another process are reported too); ``num_train`` (first N training
images, 0 = all); ``num_val`` (hold out N training images and report on them instead of the test set);
``train`` (every ``train.TrainConfig`` field but ``trainable``); ``adversarial_weight_decay`` (λ of the
adversarial run, () = ``train.weight_decay``); ``dropout`` and ``adversarial_dropout``; ``pool``
(``PoolConfig`` fields, ``warmup_epochs`` instead of steps, ``perturbation_rms`` 0 = off, ``pool.attack``
every ``AttackOptions`` field); ``lipschitz`` (``penalty``: a ``train.TrainConfig.lipschitz_penalty`` form,
``strengths``: one run per μ, ``target``: the "hinge" form's threshold, ``dropout``: whether those runs use
``dropout`` too); ``eval_attack`` (the distortion attack, every ``AttackOptions`` field); ``num_attack``;
``chunk_size``.
E.g. ``--config.pool.attack.maxiter=20 --config.sweep_seeds="(0,1,2,3)"``.
"""

import dataclasses

import ml_collections

from intriguing_jax import attack
from intriguing_jax import train


def _options(options):
  return ml_collections.ConfigDict(dataclasses.asdict(options))


def get_config(arg=None):
  """The config of preset ``arg`` (None, "smoke", "paper" or "conv")."""
  c = ml_collections.ConfigDict()
  c.model = "fc100-100-10"
  c.seed = 0
  c.sweep_seeds = ()
  c.runs = ("weight_decay", "dropout", "adversarial", "lipschitz")
  c.num_train = 0
  c.num_val = 0
  recipe = dict(train.RECIPES["fc100-100-10"]["config"], epochs=150, learning_rate=1e-2)
  c.train = {k: v for k, v in dataclasses.asdict(train.TrainConfig(**recipe)).items() if k != "trainable"}
  c.adversarial_weight_decay = ()
  c.dropout = dict(dropout_rate=0.1, input_dropout_rate=0.05)
  c.adversarial_dropout = True
  pool_attack = dataclasses.replace(attack.AttackOptions(), maxiter=10, history_size=5, tol=1e-3,
                                    c_grid=(0.1, 1.0), num_bisection=0, refine_rounds=0, refine_steps=10,
                                    untargeted=True)
  c.pool = dict(layers=("input",), pool_size=640, refresh_every=4, refresh_fraction=0.025, mix_ratio=0.1,
                warmup_epochs=2.0, perturbation_scale=1.0, pool_loss_weight=1.0, perturbation_rms=0.035,
                attack=_options(pool_attack))
  c.lipschitz = dict(penalty="log", strengths=(0.03, 0.1), target=1.0, dropout=False)
  c.eval_attack = _options(attack.AttackOptions(maxiter=100, num_bisection=10))
  c.num_attack = 100
  c.chunk_size = 100
  if arg == "smoke":
    c.num_train, c.train.epochs, c.num_attack, c.eval_attack.maxiter = 2000, 2, 20, 30
    c.pool.pool_size, c.pool.refresh_every, c.pool.warmup_epochs = 200, 5, 0.5
  elif arg == "paper":
    c.train.epochs, c.train.learning_rate, c.adversarial_dropout = 40, 1e-3, False
    c.dropout = dict(dropout_rate=0.2, input_dropout_rate=0.1)
    c.pool.update(layers=("input", "hidden_0", "hidden_1"), pool_size=5000, refresh_every=50,
                  refresh_fraction=0.02, mix_ratio=0.3, perturbation_rms=0.0)
    c.pool.attack.untargeted = False
  elif arg == "conv":
    c.model, c.dropout, c.num_train, c.num_attack = "mnist_conv", dict(dropout_rate=0.5), 10000, 50
    c.train.update(epochs=2, learning_rate=1e-3, weight_decay=(1e-5,))
    c.pool.warmup_epochs = 0.5
  elif arg:
    raise ValueError(f"adversarial_training config: unknown preset {arg!r}; known: smoke, paper, conv")
  return c
