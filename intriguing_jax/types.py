"""Type aliases shared by the library."""

from typing import Any, Callable

import jax

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree, usually Flax variables {"params": ...}
PyTree = Any
# apply_fn(params, x) -> logits, as Flax's `model.apply`.
ApplyFn = Callable[[Params, Array], Array]
# logits_fn(x) -> logits, e.g. functools.partial(model.apply, params).
LogitsFn = Callable[[Array], Array]
