r"""Benchmark: the time of a training step with and without the exact Lipschitz penalty.

Commands (CPU, 2 shared cores, ~1 min each; figures in notes/lipschitz.md)::

    python scripts/bench/lipschitz_penalty.py                 # the MNIST ConvNet
    python scripts/bench/lipschitz_penalty.py --config=intriguing_jax/configs/bench_lipschitz.py:fc

Trains ``config.model`` through the one driver (``train.train_model``) on synthetic MNIST-sized data, once
per penalty form and once without (``lipschitz_penalty="none"``), ``repeats + 1`` epochs of ``steps`` steps.
Prints per form the median steady-state step time (epochs after the first, which compiles) and its ratio
to the plain step. Goal (issue 19): the exact penalty at most 2x a plain step on the ConvNet.
With ``--workdir`` the figures also go to ``<workdir>/bench_lipschitz.json``.
"""

import numpy as np

from intriguing_jax import cli
from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import train

FLAGS = cli.define_flags("bench_lipschitz", workdir_required=False,
                         workdir_help="If set, the figures also go to <workdir>/bench_lipschitz.json.")


def main(argv):
  cli.check_no_args(argv)
  c = FLAGS.config.value
  x, y = data.synthetic_mnist(c.steps * c.batch_size, seed=0)
  model = models.get_model(c.model, **c.model_kwargs)
  rows = {}
  for form in ("none",) + tuple(c.forms):
    config = train.TrainConfig(epochs=c.repeats + 1, batch_size=c.batch_size, lipschitz_penalty=form,
                               lipschitz_strength=0.0 if form == "none" else c.strength)
    history = train.train_model(model, x, y, config, seed=0).history
    step_ms = 1e3 * float(np.median([h["seconds"] for h in history[1:]])) / c.steps
    rows[form] = {"step_ms": step_ms, "first_epoch_s": history[0]["seconds"]}
  plain = rows["none"]["step_ms"]
  print(f"{c.model} {dict(c.model_kwargs)}, batch {c.batch_size}, {c.steps} steps x {c.repeats} epochs")
  print(f"{'penalty':<10}{'step ms':>10}{'vs plain':>10}{'1st epoch s':>13}")
  for form, r in rows.items():
    r["ratio"] = r["step_ms"] / plain
    print(f"{form:<10}{r['step_ms']:>10.2f}{r['ratio']:>9.2f}x{r['first_epoch_s']:>13.2f}")
  cli.write_figures(FLAGS.workdir.value, "bench_lipschitz", dict(rows=rows), c)


if __name__ == "__main__":
  cli.run(main)
