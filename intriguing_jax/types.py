"""Type aliases shared by the library, and :func:`static_fn` for functions used as compilation keys."""

import dataclasses
import inspect
from typing import Any, Callable

import jax
import numpy as np

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree, usually Flax variables {"params": ...}
PyTree = Any
# apply_fn(params, x) -> logits, as Flax's `model.apply`: the library's one calling convention.
ApplyFn = Callable[[Params, Array], Array]


def is_integer(value: Any) -> bool:
  """Whether ``value`` is a Python or numpy integer and not a bool (for validating counts)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class _BoundMethod:
  """``obj.method`` compared and hashed by the VALUE of ``obj`` (Python compares bound methods by
  identity)."""
  obj: Any
  func: Callable

  def __call__(self, *args, **kwargs):
    return self.func(self.obj, *args, **kwargs)


def static_fn(fn: Callable) -> Callable:
  """``fn`` as a compilation key: a bound method of a hashable object (a Flax ``model.apply``) becomes a
  callable equal to every bound method of an equal object, so two equal modules built separately share one
  compiled program. Other callables are returned unchanged.
  """
  if inspect.ismethod(fn):
    try:
      hash(fn.__self__)
    except TypeError:
      return fn
    return _BoundMethod(fn.__self__, fn.__func__)
  return fn
