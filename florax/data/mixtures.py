"""Several datasets in one run: FLAVA round-robin and BEiT-3 fixed composition.

Round-robin (FLAVA §4): every step draws one dataset with probability equal
to its weight and yields one whole batch of it, as `{name: batch}`; the draw is
a function of (seed, step), so the choice sequence replays after a restore.
The trainer draws its batch kind per step with the same function
(`round_robin_choices`), so a task's kinds are mixed exactly like datasets.

Fixed composition (BEiT-3 §3): every step yields one batch from every dataset,
`{name: batch, ...}` (e.g. n images + n texts + n pairs).

Both are Grain `DatasetIterator`s whose state nests their children's states.
"""

from __future__ import annotations

from typing import Callable, Mapping

import grain
import ml_collections
import numpy as np


def _child_metrics(iterators: Mapping[str, grain.DatasetIterator]) -> dict:
  out: dict[str, float] = {"data/skipped": 0}
  for name, it in iterators.items():
    if hasattr(it, "metrics"):
      m = it.metrics()
      out["data/skipped"] += m.get("data/skipped", 0)
      out[f"data/{name}/skipped"] = m.get("data/skipped", 0)
  return out


def _uniform(seed: int, steps: np.ndarray) -> np.ndarray:
  """A uniform [0, 1) draw per step, a pure function of (seed, step).

  SplitMix64 of a (seed, step) counter: vectorised, so counting the kinds of
  a million past steps on resume takes milliseconds.
  """
  with np.errstate(over="ignore"):
    z = (np.asarray(steps, np.uint64) + np.uint64(seed & (2**32 - 1)) *
         np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def round_robin_choices(weights: Mapping[str, float], seed: int,
                        steps) -> np.ndarray:
  """Index into `list(weights)` drawn at each of `steps` (by weight).

  Args:
    weights: name -> sampling weight (>= 0, positive sum; normalised here).
    seed: seed of the choice sequence.
    steps: int or array of step numbers.
  """
  w = np.asarray(list(weights.values()), np.float64)
  if (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"mixture weights must be >= 0 with a positive sum, "
                     f"got {dict(weights)}")
  cdf = np.cumsum(w / w.sum())
  k = np.searchsorted(cdf, _uniform(seed, np.atleast_1d(steps)), side="right")
  return np.minimum(k, len(w) - 1)


class RoundRobinMixture(grain.DatasetIterator):
  """Each step: one dataset chosen by weight, its next batch as {name: batch}.

  Args:
    iterators: name -> batch iterator.
    weights: name -> sampling weight (normalised here).
    seed: seed of the choice sequence.
  """

  def __init__(self, iterators: Mapping[str, grain.DatasetIterator],
               weights: Mapping[str, float], seed: int = 0):
    if set(iterators) != set(weights):
      raise ValueError(f"mixture datasets {sorted(iterators)} and weights "
                       f"{sorted(weights)} differ")
    super().__init__(list(iterators.values()))
    self._names = list(iterators)
    self._iters = dict(iterators)
    self._weights = {n: weights[n] for n in self._names}
    round_robin_choices(self._weights, 0, 0)  # checks the weights
    self._seed = int(seed)
    self._step = 0

  def choice(self, step: int) -> str:
    """The dataset drawn at `step` (pure function of seed and step)."""
    return self._names[int(round_robin_choices(self._weights, self._seed,
                                               step)[0])]

  def __next__(self):
    name = self.choice(self._step)
    batch = next(self._iters[name])
    self._step += 1
    return {name: batch}

  def metrics(self) -> dict:
    return _child_metrics(self._iters)

  def get_state(self):
    return {"step": self._step,
            "iterators": {n: it.get_state() for n, it in self._iters.items()}}

  def set_state(self, state):
    if set(state["iterators"]) != set(self._iters):
      raise ValueError(f"mixture state holds {sorted(state['iterators'])}, "
                       f"this run mixes {sorted(self._iters)}")
    self._step = state["step"]
    for n, s in state["iterators"].items():
      self._iters[n].set_state(s)

  def close(self):
    for it in self._iters.values():
      getattr(it, "close", lambda: None)()


class FixedComposition(grain.DatasetIterator):
  """Each step: the next batch of every dataset, as {name: batch, ...}."""

  def __init__(self, iterators: Mapping[str, grain.DatasetIterator]):
    super().__init__(list(iterators.values()))
    self._iters = dict(iterators)

  def __next__(self):
    return {n: next(it) for n, it in self._iters.items()}

  def metrics(self) -> dict:
    return _child_metrics(self._iters)

  def get_state(self):
    return {"iterators": {n: it.get_state() for n, it in self._iters.items()}}

  def set_state(self, state):
    if set(state["iterators"]) != set(self._iters):
      raise ValueError(f"mixture state holds {sorted(state['iterators'])}, "
                       f"this run mixes {sorted(self._iters)}")
    for n, s in state["iterators"].items():
      self._iters[n].set_state(s)

  def close(self):
    for it in self._iters.values():
      getattr(it, "close", lambda: None)()


def make_mixture_iterator(mix_cfg: ml_collections.ConfigDict,
                          make_iterator: Callable | None = None, **kwargs
                          ) -> grain.DatasetIterator:
  """Builds a mixture from config.

  mix_cfg fields: `kind` ("round_robin" | "fixed"), `seed`, `datasets`: name
  -> {weight (round_robin only), data: a data ConfigDict}. Each dataset's own
  `data.batch_size` is its batch (for "fixed": n per kind).

  Args:
    mix_cfg: the mixture ConfigDict.
    make_iterator: data ConfigDict -> iterator (default
      `record_pipeline.make_train_iterator`); kwargs are passed through.
  """
  if make_iterator is None:
    from florax.data.record_pipeline import make_train_iterator  # pylint: disable=g-import-not-at-top
    make_iterator = make_train_iterator
  if not mix_cfg.datasets:
    raise ValueError("mixture.datasets is empty")
  iters = {name: make_iterator(d.data, **kwargs)
           for name, d in mix_cfg.datasets.items()}
  if mix_cfg.kind == "round_robin":
    return RoundRobinMixture(
        iters, {n: d.weight for n, d in mix_cfg.datasets.items()},
        mix_cfg.get("seed", 0))
  if mix_cfg.kind == "fixed":
    return FixedComposition(iters)
  raise ValueError(f"mixture.kind must be 'round_robin' or 'fixed', got "
                   f"{mix_cfg.kind!r}")
