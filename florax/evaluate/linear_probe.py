"""Linear probe: L2-regularised multinomial logistic regression on features.

Objective (bias not penalised):

  mean_i CE(softmax(x_i W + b), y_i) + l2 / 2 * ||W||^2

This is scikit-learn's `LogisticRegression(C=...)` with C = 1 / (n * l2)
(sklearn sums the losses and scales them by C instead). Solved full-batch with
L-BFGS (optax) inside one jitted while-loop, so it runs on the accelerator;
`l2` is a traced argument, so a whole regularisation sweep compiles once.

As in CLIP §3.2 / App. A.3, `l2` is chosen on a validation split by a sweep
over a log grid, refined coarse-to-fine around the best value, then the model
is refitted on train+val with that `l2` and scored on test.

Predictions follow the suite's pessimistic tie rule: an example counts as
correct only when its true class's logit is strictly above every other.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_L2_GRID = tuple(10.0 ** e for e in range(-6, 2))  # 1e-6 .. 1e1


def _objective(params, x, onehot, l2):
  w, b = params
  logits = x @ w + b
  ce = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
  return ce + 0.5 * l2 * jnp.sum(w * w)


def solve(x, y, l2, num_classes, max_iter, tol):
  """The solver behind `train_logreg`, un-jitted so callers can vmap it.

  Args and returns as in `train_logreg` (num_classes and max_iter must be
  Python ints).
  """
  onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)
  fun = functools.partial(_objective, x=x, onehot=onehot, l2=l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)
  params = (jnp.zeros((x.shape[1], num_classes), x.dtype),
            jnp.zeros((num_classes,), x.dtype))

  def cond(carry):
    _, state, it = carry
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (it == 0) | ((it < max_iter) & (grad_norm >= tol))

  def body(carry):
    params, state, it = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=fun)
    return optax.apply_updates(params, updates), state, it + 1

  params, _, _ = jax.lax.while_loop(cond, body,
                                    (params, opt.init(params), jnp.int32(0)))
  return params


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def train_logreg(x, y, l2, *, num_classes: int, max_iter: int = 500,
                 tol: float = 1e-6):
  """Fits the L2-regularised multinomial logistic regression.

  Args:
    x: (n, d) float features.
    y: (n,) int labels in [0, num_classes).
    l2: scalar regularisation strength on W (see module docstring).
    num_classes: number of classes (static).
    max_iter: L-BFGS iteration cap (static).
    tol: stop once the gradient's L2 norm falls below this.

  Returns:
    (w (d, num_classes), b (num_classes,)).
  """
  return solve(x, y, l2, num_classes, max_iter, tol)


def strictly_correct(logits, y):
  """Bool per row: the true class's logit beats every other strictly."""
  true = jnp.take_along_axis(logits, y[..., None], axis=-1)
  other = jnp.arange(logits.shape[-1]) != y[..., None]
  return ~jnp.any(other & (logits >= true), axis=-1)


@jax.jit
def _score(params, x, y):
  w, b = params
  logits = x @ w + b
  ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None],
                                     axis=1))
  return jnp.mean(strictly_correct(logits, y)), ce


def _check_split(name, x, y, num_classes=None):
  x = np.asarray(x, np.float32)
  y = np.asarray(y)
  if x.ndim != 2:
    raise ValueError(f"{name}_x must be (n, d), got shape {x.shape}")
  if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(
        f"{name}_y must be int of shape ({x.shape[0]},), got {y.dtype} "
        f"{y.shape}")
  if x.shape[0] == 0:
    raise ValueError(f"{name} split is empty")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}_x contains NaN or inf")
  if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
    raise ValueError(
        f"{name}_y must lie in [0, {num_classes}); got [{y.min()}, {y.max()}]")
  return x, y.astype(np.int32)


class _Standardizer:
  """Per-feature z-scoring from training statistics: conditions L-BFGS."""

  def __init__(self, x):
    self.mean = x.mean(axis=0)
    self.std = x.std(axis=0) + 1e-6

  def __call__(self, x):
    return (x - self.mean) / self.std


def sweep(train_x, train_y, val_x, val_y, *, num_classes: int | None = None,
          l2_grid: Sequence[float] = DEFAULT_L2_GRID, refine_steps: int = 3,
          standardize: bool = True, max_iter: int = 500
          ) -> list[tuple[float, float, float]]:
  """Regularisation sweep on a validation split, coarse then fine.

  The coarse grid is evaluated first; then `refine_steps` times the two
  points halfway (in log10 space) between the best l2 so far and its
  neighbours are added, the half-step shrinking each round (0.5, 0.25,
  ... decades for a grid spaced one decade apart). Points outside the grid's
  range are not tried.

  Args:
    train_x, train_y, val_x, val_y: features (n, d) and int labels (n,).
    num_classes: defaults to 1 + the largest label seen.
    l2_grid: coarse grid of l2 values (> 0), log-spaced.
    refine_steps: number of refinement rounds.
    standardize: z-score features with training statistics first.
    max_iter: L-BFGS iteration cap per fit.

  Returns:
    [(l2, val_acc, val_loss)] for every l2 tried, best first (highest val
    accuracy, then lowest val cross-entropy, then largest l2).
  """
  train_x, train_y = _check_split("train", train_x, train_y)
  val_x, val_y = _check_split("val", val_x, val_y)
  if train_x.shape[1] != val_x.shape[1]:
    raise ValueError(
        f"train and val features differ in width: {train_x.shape[1]} vs "
        f"{val_x.shape[1]}")
  if num_classes is None:
    num_classes = int(max(train_y.max(), val_y.max())) + 1
  _check_split("train", train_x, train_y, num_classes)
  _check_split("val", val_x, val_y, num_classes)
  grid = sorted(float(v) for v in l2_grid)
  if not grid or grid[0] <= 0:
    raise ValueError(f"l2_grid must hold positive values, got {l2_grid}")
  if standardize:
    norm = _Standardizer(train_x)
    train_x, val_x = norm(train_x), norm(val_x)
  tx, ty = jnp.asarray(train_x), jnp.asarray(train_y)
  vx, vy = jnp.asarray(val_x), jnp.asarray(val_y)

  results = {}  # log10(l2) -> (acc, loss)

  def evaluate(log_l2):
    key = round(log_l2, 6)
    if key not in results:
      params = train_logreg(tx, ty, jnp.float32(10.0 ** log_l2),
                            num_classes=num_classes, max_iter=max_iter)
      acc, loss = _score(params, vx, vy)
      results[key] = (float(acc), float(loss))

  def ordered():
    return sorted(results, key=lambda e: (-results[e][0], results[e][1], -e))

  logs = [float(np.log10(v)) for v in grid]
  for e in logs:
    evaluate(e)
  step = (logs[-1] - logs[0]) / max(len(logs) - 1, 1) / 2
  for _ in range(refine_steps if len(logs) > 1 else 0):
    best = ordered()[0]
    for e in (best - step, best + step):
      if logs[0] <= e <= logs[-1]:  # refine inside the grid, never beyond
        evaluate(e)
    step /= 2
  return [(10.0 ** e, results[e][0], results[e][1]) for e in ordered()]


def fit_and_score(train_x, train_y, val_x, val_y, test_x, test_y, *,
                  num_classes: int | None = None,
                  l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                  refine_steps: int = 3, standardize: bool = True,
                  max_iter: int = 500) -> dict[str, float]:
  """Sweeps l2 on val, refits on train+val with the best, scores test.

  Args:
    train_x, train_y, val_x, val_y, test_x, test_y: features (n, d) and int
      labels (n,) of the three splits.
    num_classes, l2_grid, refine_steps, standardize, max_iter: see `sweep`.

  Returns:
    {"test_acc", "val_acc" (of the chosen l2, fitted on train only),
     "trainval_acc" (final fit on its own data), "l2"}: plain floats.
  """
  if num_classes is None:
    num_classes = int(max(np.max(train_y), np.max(val_y), np.max(test_y))) + 1
  table = sweep(train_x, train_y, val_x, val_y, num_classes=num_classes,
                l2_grid=l2_grid, refine_steps=refine_steps,
                standardize=standardize, max_iter=max_iter)
  best_l2, val_acc, _ = table[0]
  train_x, train_y = _check_split("train", train_x, train_y, num_classes)
  val_x, val_y = _check_split("val", val_x, val_y, num_classes)
  test_x, test_y = _check_split("test", test_x, test_y, num_classes)
  if test_x.shape[1] != train_x.shape[1]:
    raise ValueError(
        f"train and test features differ in width: {train_x.shape[1]} vs "
        f"{test_x.shape[1]}")
  all_x = np.concatenate([train_x, val_x])
  all_y = np.concatenate([train_y, val_y])
  if standardize:
    norm = _Standardizer(all_x)
    all_x, test_x = norm(all_x), norm(test_x)
  params = train_logreg(jnp.asarray(all_x), jnp.asarray(all_y),
                        jnp.float32(best_l2), num_classes=num_classes,
                        max_iter=max_iter)
  test_acc, _ = _score(params, jnp.asarray(test_x), jnp.asarray(test_y))
  fit_acc, _ = _score(params, jnp.asarray(all_x), jnp.asarray(all_y))
  return {"test_acc": float(test_acc), "val_acc": val_acc,
          "trainval_acc": float(fit_acc), "l2": float(best_l2)}
