"""Building blocks shared by every backbone.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`,
`vocab`, ...). Models never mention a mesh: `florax.parallel` maps these names
to mesh axes from a table in the config.

Mixed precision: parameters are stored in `param_dtype` (fp32 masters);
matmuls run in `dtype`; LayerNorm and softmax always run in fp32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


class DenseGeneral(nn.Module):
  """y = x · W + b contracting `axis` of x; W has its full N-d shape.

  Flax's own DenseGeneral initialises a flattened 2-D kernel and reshapes
  it, so a logical-axis box on its initializer sees the wrong rank once a
  mesh is active; this one creates every parameter in its real shape.
  """
  features: tuple
  axes: tuple
  axis: tuple = (-1,)
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x):
    axis = tuple(a % x.ndim for a in self.axis)
    in_shape = tuple(x.shape[a] for a in axis)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
        in_shape + self.features, jnp.float32)
    contract = (axis, tuple(range(len(axis))))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            (contract, ((), ())))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(
              nn.initializers.zeros, self.axes[-len(self.features):]),
          self.features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes: tuple, *, dtype=jnp.float32, name=None,
          use_bias=True, kernel_init=default_kernel_init, axis=-1):
  """A DenseGeneral whose kernel/bias carry logical axis names.

  `axes` names every kernel dimension: contracted input dims first, then the
  output dims (as in MaxText's linears).
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  if len(axes) != len(axis) + len(features):
    raise ValueError(f"dense: {len(axes)} axis names for a kernel of rank "
                     f"{len(axis) + len(features)}")
  return DenseGeneral(features=features, axes=tuple(axes), axis=axis,
                      use_bias=use_bias, dtype=dtype, kernel_init=kernel_init,
                      name=name)


def layer_norm(name=None, axis_name="embed", epsilon=1e-5):
  """LayerNorm computed and returned in fp32 (numerically sensitive)."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)))


class Mlp(nn.Module):
  """Transformer feed-forward: Dense -> GELU -> Dense."""
  hidden: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    width = x.shape[-1]
    h = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = nn.gelu(h, approximate=False)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return dense(width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample.

  Uses the 'dropout' rng stream, so a caller that replays the same rng key
  (the gradient cache does) gets the same dropped samples.
  """
  rate: Any  # a float, or a traced scalar when blocks are scanned

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if deterministic or (isinstance(self.rate, (int, float))
                         and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    rng = self.make_rng("dropout")
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(rng, keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_all_dots": jax.checkpoint_policies.checkpoint_dots,
}


def maybe_remat(module_cls, policy: str, static_argnums: Sequence[int] = ()):
  """Wraps a block class in `nn.remat` with a named policy ('none' = off)."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; choose one of "
                     f"{sorted(REMAT_POLICIES)}")
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy],
                  static_argnums=tuple(static_argnums), prevent_cse=True)


def drop_path_rates(total_rate: float, depth: int) -> list[float]:
  """Stochastic depth rising linearly from 0 to `total_rate` over the blocks."""
  if depth <= 1:
    return [total_rate] * depth
  return [total_rate * i / (depth - 1) for i in range(depth)]
