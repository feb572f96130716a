"""Few-shot transfer: N-way K-shot episodes with a linear head.

Protocol (CD-FSL, as reported in the Florence paper): each episode draws
`n_way` classes, then `k_shot` support and `n_query` query examples per class,
all distinct. A logistic-regression head (`linear_probe.train_logreg`, fixed
`l2`, no sweep: there is no validation split inside an episode) is fitted on
the support features and scored on the queries. The result is the mean query
accuracy over episodes and its 95% confidence interval,
1.96 * std(ddof=1) / sqrt(episodes).

Features are L2-normalised before the head, so one fixed `l2` suits any
model's feature scale. Episodes are drawn on the host with a seeded numpy
generator (reproducible, independent of the device count) and solved
`episode_batch` at a time with `jax.vmap` over one jitted solver; the last
batch is padded with repeats of episodes that are then dropped, so it
compiles once. Queries are scored with the suite's pessimistic tie rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from florax.evaluate import linear_probe


def sample_episodes(labels, n_way: int, k_shot: int, n_query: int,
                    episodes: int, seed: int):
  """Draws episode indices.

  Args:
    labels: (n,) int class of every example.
    n_way, k_shot, n_query: classes per episode, support and query examples
      per class.
    episodes: number of episodes.
    seed: seed of the numpy generator.

  Returns:
    (support_idx (E, n_way*k_shot), query_idx (E, n_way*n_query)) int arrays
    into `labels`, class-major: positions [c*k_shot, (c+1)*k_shot) of an
    episode's support belong to its c-th class (likewise for queries).
  """
  labels = np.asarray(labels)
  for name, v in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query),
                  ("episodes", episodes)):
    if v < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")
  if n_way < 2:
    raise ValueError(f"n_way must be >= 2, got {n_way}")
  classes, counts = np.unique(labels, return_counts=True)
  eligible = classes[counts >= k_shot + n_query]
  if eligible.size < n_way:
    raise ValueError(
        f"only {eligible.size} classes have >= k_shot + n_query = "
        f"{k_shot + n_query} examples; a {n_way}-way episode needs {n_way}")
  members = {c: np.flatnonzero(labels == c) for c in eligible}
  rng = np.random.default_rng(seed)
  support = np.empty((episodes, n_way, k_shot), np.int64)
  query = np.empty((episodes, n_way, n_query), np.int64)
  for e in range(episodes):
    for slot, c in enumerate(rng.choice(eligible, n_way, replace=False)):
      picked = rng.choice(members[c], k_shot + n_query, replace=False)
      support[e, slot], query[e, slot] = picked[:k_shot], picked[k_shot:]
  return support.reshape(episodes, -1), query.reshape(episodes, -1)


@functools.partial(jax.jit,
                   static_argnames=("n_way", "k_shot", "n_query", "max_iter"))
def _episode_accuracies(features, support_idx, query_idx, l2, *, n_way, k_shot,
                        n_query, max_iter):
  support_y = jnp.repeat(jnp.arange(n_way, dtype=jnp.int32), k_shot)
  query_y = jnp.repeat(jnp.arange(n_way, dtype=jnp.int32), n_query)

  def one(s_idx, q_idx):
    w, b = linear_probe.solve(features[s_idx], support_y, l2, n_way,
                              max_iter, 1e-6)
    logits = features[q_idx] @ w + b
    return jnp.mean(linear_probe.strictly_correct(logits, query_y))

  return jax.vmap(one)(support_idx, query_idx)


def evaluate(features, labels, n_way: int = 5, k_shot: int = 5,
             n_query: int = 15, episodes: int = 600, seed: int = 0, *,
             l2: float = 1e-3, episode_batch: int = 100, max_iter: int = 200,
             return_episode_accs: bool = False) -> dict:
  """Mean few-shot accuracy and its 95% confidence interval.

  Args:
    features: (n, d) frozen features of a labelled pool.
    labels: (n,) int class of every example.
    n_way, k_shot, n_query: episode shape (Florence / CD-FSL: 5-way,
      5/20/50-shot, 15 queries).
    episodes: number of episodes (600 in CD-FSL).
    seed: seed of the episode sampler.
    l2: fixed L2 strength of the head (objective in `linear_probe`).
    episode_batch: episodes solved together under one vmap.
    max_iter: L-BFGS iteration cap per episode.
    return_episode_accs: also return the per-episode accuracies.

  Returns:
    {"acc": mean accuracy, "ci95": half-width of the 95% interval} as floats,
    plus "episode_accs" (numpy (episodes,)) if asked for.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(
        f"features must be (n, d) and labels (n,); got {features.shape} and "
        f"{labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got {labels.dtype}")
  if not np.all(np.isfinite(features)):
    raise ValueError("features contain NaN or inf")
  if episode_batch < 1:
    raise ValueError(f"episode_batch must be >= 1, got {episode_batch}")
  support, query = sample_episodes(labels, n_way, k_shot, n_query, episodes,
                                   seed)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  feats = jnp.asarray(features / np.maximum(norms, 1e-12))

  batch = min(episode_batch, episodes)
  pad = (-episodes) % batch
  # Padding repeats episode 0; its extra results are cut off below.
  support = np.concatenate([support, np.repeat(support[:1], pad, 0)])
  query = np.concatenate([query, np.repeat(query[:1], pad, 0)])
  accs = []
  for start in range(0, support.shape[0], batch):
    accs.append(np.asarray(_episode_accuracies(
        feats, jnp.asarray(support[start:start + batch]),
        jnp.asarray(query[start:start + batch]), jnp.float32(l2),
        n_way=n_way, k_shot=k_shot, n_query=n_query, max_iter=max_iter)))
  accs = np.concatenate(accs)[:episodes].astype(np.float64)
  ci95 = (1.96 * accs.std(ddof=1) / np.sqrt(episodes)) if episodes > 1 else (
      float("nan"))
  out = {"acc": float(accs.mean()), "ci95": float(ci95)}
  if return_episode_accs:
    out["episode_accs"] = accs
  return out
