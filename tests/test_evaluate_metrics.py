"""Evaluator cores against independent references (numpy loops, sklearn).

Ties are built on purpose: embeddings with entries in {-1, 0, 1} give integer
dot products, exact in any summation order, so numpy and XLA agree bit for bit
and many scores coincide. The references rank by sorting (a stable lexsort
that puts right answers after wrong ones on equal scores) where the code
under test counts, so they share no logic.
"""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from florax.evaluate import few_shot
from florax.evaluate import linear_probe
from florax.evaluate import retrieval
from florax.evaluate import zeroshot


# ---------------------------------------------------------------- references


def _pessimistic_rank(scores, is_right):
  """Position of the first right candidate when sorting by score, descending,
  wrong candidates first among equals (numpy lexsort: last key is primary)."""
  order = np.lexsort((is_right.astype(int), -scores))
  return int(np.flatnonzero(is_right[order])[0])


def _ternary(rng, shape):
  return rng.integers(-1, 2, size=shape).astype(np.float32)


# ------------------------------------------------------------------ zero-shot


def test_imagenet_templates_are_clips_80():
  t = zeroshot.IMAGENET_TEMPLATES
  assert len(t) == 80 and len(set(t)) == 80
  assert all(s.count("{}") == 1 for s in t)
  assert t[0] == "a bad photo of a {}." and t[-1] == "a tattoo of the {}."


def _fake_text_encoder(texts, d=6):
  # Deterministic, depends on every character and its position.
  out = np.zeros((len(texts), d))
  for i, s in enumerate(texts):
    for pos, ch in enumerate(s):
      out[i] += np.sin(ord(ch) * (np.arange(d) + 1) + 0.37 * pos)
  return jnp.asarray(out, jnp.float32)  # a jax array, as a real tower gives


def test_class_embeddings_match_numpy_prompt_ensemble():
  names = ["cat", "dog", "apple pie", "x"]
  templates = zeroshot.IMAGENET_TEMPLATES[:9]
  got = zeroshot.class_embeddings(_fake_text_encoder, names, templates,
                                  batch_size=7)  # chunks straddle classes
  want = []
  for name in names:
    vecs = []
    for t in templates:
      v = np.asarray(_fake_text_encoder([t.format(name)])[0], np.float64)
      vecs.append(v / np.linalg.norm(v))
    m = np.mean(vecs, axis=0)
    want.append(m / np.linalg.norm(m))
  assert got.shape == (4, 6)
  np.testing.assert_allclose(got, np.array(want), atol=1e-6)


def test_class_embeddings_reject_bad_input():
  with pytest.raises(ValueError, match="exactly one"):
    zeroshot.class_embeddings(_fake_text_encoder, ["a"], ["no slot"])
  with pytest.raises(ValueError, match="shape"):
    zeroshot.class_embeddings(lambda t: np.zeros((1, 3)), ["a", "b"], ["{}"])


def test_class_names_from_file_and_tfds_info(tmp_path, monkeypatch):
  path = tmp_path / "names.txt"
  path.write_text("tench\n  goldfish \n\ngreat white shark\n")
  assert zeroshot.load_class_names(str(path)) == [
      "tench", "goldfish", "great white shark"]
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(ValueError, match="no names"):
    zeroshot.load_class_names(str(tmp_path / "empty.txt"))

  info = types.SimpleNamespace(features={
      "label": types.SimpleNamespace(names=["apple_pie", "baby_back_ribs"]),
      "image": types.SimpleNamespace()})
  assert zeroshot.class_names_from_info(info) == ["apple pie", "baby back ribs"]
  assert zeroshot.class_names_from_info(
      info, underscores_to_spaces=False) == ["apple_pie", "baby_back_ribs"]
  with pytest.raises(ValueError, match="no feature 'fine_label'"):
    zeroshot.class_names_from_info(info, "fine_label")
  with pytest.raises(ValueError, match="not a ClassLabel"):
    zeroshot.class_names_from_info(info, "image")

  tfds = pytest.importorskip("tensorflow_datasets")
  seen = {}

  def fake_builder(name, **kwargs):
    seen.update(name=name, **kwargs)
    return types.SimpleNamespace(info=info)

  monkeypatch.setattr(tfds, "builder", fake_builder)
  assert zeroshot.class_names_from_tfds("food101", data_dir="/d") == [
      "apple pie", "baby back ribs"]
  assert seen == {"name": "food101", "data_dir": "/d"}


def _topk_reference(image_emb, class_emb, labels, ks):
  scores = image_emb.astype(np.float64) @ class_emb.astype(np.float64).T
  ranks = []
  for s, y in zip(scores, labels):
    is_right = np.arange(len(s)) == y
    ranks.append(_pessimistic_rank(s, is_right))
  ranks = np.array(ranks)
  return {f"top{k}": float(np.mean(ranks < k)) for k in ks}, scores


def test_topk_accuracy_matches_bruteforce_with_ties():
  rng = np.random.default_rng(0)
  n, c, d = 301, 12, 4
  class_emb = _ternary(rng, (c, d))
  class_emb[5] = class_emb[2]  # identical classes: guaranteed ties
  image_emb = _ternary(rng, (n, d))
  labels = rng.integers(0, c, n)
  want, scores = _topk_reference(image_emb, class_emb, labels, (1, 3, 5))
  true = scores[np.arange(n), labels]
  others_tied = (scores == true[:, None]).sum(1) - 1
  assert (others_tied > 0).mean() > 0.3  # the ties are real and frequent

  acc = zeroshot.TopKAccuracy(class_emb, ks=(1, 3, 5))
  for lo, hi in [(0, 100), (100, 101), (101, 250), (250, n)]:  # ragged
    acc.update(image_emb[lo:hi], labels[lo:hi])
  assert acc.result() == pytest.approx(want, abs=1e-12)
  # One-shot helper gives the same; optimistic counting would not.
  assert zeroshot.topk_accuracy(image_emb, class_emb, labels,
                                (1, 3, 5)) == pytest.approx(want, abs=1e-12)
  optimistic_top1 = np.mean((scores > true[:, None]).sum(1) < 1)
  assert optimistic_top1 > want["top1"] + 0.05


def test_topk_accuracy_random_floats_and_padding_mask():
  rng = np.random.default_rng(1)
  n, c, d = 200, 30, 16
  class_emb = rng.normal(size=(c, d)).astype(np.float32)
  image_emb = rng.normal(size=(n, d)).astype(np.float32)
  labels = rng.integers(0, c, n)
  want, _ = _topk_reference(image_emb, class_emb, labels, (1, 5))
  acc = zeroshot.TopKAccuracy(class_emb)
  # A padded batch: junk rows and out-of-range labels under mask=False.
  pad_emb = np.concatenate([image_emb, np.ones((8, d), np.float32)])
  pad_lab = np.concatenate([labels, np.full(8, -1)])
  acc.update(pad_emb, pad_lab, mask=np.arange(n + 8) < n)
  assert acc.count == n
  assert acc.result() == pytest.approx(want, abs=1e-12)


def test_topk_accuracy_collapsed_model_scores_zero_and_bad_input():
  class_emb = np.ones((4, 3), np.float32)  # every class scores the same
  got = zeroshot.topk_accuracy(np.ones((5, 3)), class_emb, np.arange(5) % 4,
                               ks=(1, 3))
  assert got == {"top1": 0.0, "top3": 0.0}
  with pytest.raises(ValueError, match="every k"):
    zeroshot.TopKAccuracy(class_emb, ks=(5,))
  acc = zeroshot.TopKAccuracy(class_emb, ks=(1,))
  with pytest.raises(ValueError, match="labels must lie"):
    acc.update(np.ones((2, 3)), np.array([0, 4]))
  with pytest.raises(ValueError, match="before any update"):
    acc.result()


# ------------------------------------------------------------------ retrieval


def _retrieval_reference(image_emb, text_emb, t2i, ks):
  sims = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
  i2t = [_pessimistic_rank(sims[i], t2i == i) for i in range(len(image_emb))]
  t2i_r = [_pessimistic_rank(sims[:, j], np.arange(len(image_emb)) == t2i[j])
           for j in range(len(text_emb))]
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(np.array(i2t) < k))
    out[f"t2i_r{k}"] = float(np.mean(np.array(t2i_r) < k))
  return out, np.array(i2t), np.array(t2i_r)


def _coco_like(rng, n_img, d, ternary):
  caps = rng.integers(1, 6, n_img)  # 1..5 captions per image
  t2i = np.repeat(np.arange(n_img), caps)
  t2i = t2i[rng.permutation(len(t2i))]  # captions not grouped by image
  make = _ternary if ternary else (
      lambda r, s: r.normal(size=s).astype(np.float32))
  image_emb = make(rng, (n_img, d))
  text_emb = make(rng, (len(t2i), d))
  return image_emb, text_emb, t2i


@pytest.mark.parametrize("ternary,chunk", [(True, 7), (False, 4096)])
def test_recall_at_k_matches_bruteforce(ternary, chunk):
  rng = np.random.default_rng(2)
  image_emb, text_emb, t2i = _coco_like(rng, 41, 3 if ternary else 8, ternary)
  if ternary:
    text_emb[5] = text_emb[0]  # duplicate captions and images
    image_emb[3] = image_emb[1]
  ks = (1, 5, 10)
  want, want_i2t, want_t2i = _retrieval_reference(image_emb, text_emb, t2i, ks)
  got_i2t, got_t2i = retrieval.ranks(image_emb, text_emb, t2i,
                                     chunk_size=chunk)
  np.testing.assert_array_equal(got_i2t, want_i2t)
  np.testing.assert_array_equal(got_t2i, want_t2i)
  got = retrieval.recall_at_k(image_emb, text_emb, t2i, ks, chunk_size=chunk)
  assert got == pytest.approx(want, abs=1e-12)
  if ternary:  # the tie rule is exercised: optimistic ranks would differ
    sims = image_emb @ text_emb.T
    true = sims[t2i, np.arange(len(t2i))]
    assert np.sum((sims == true[None, :]).sum(0) > 1) > len(t2i) // 3


def test_recall_at_k_bad_input():
  e = np.eye(3, dtype=np.float32)
  with pytest.raises(ValueError, match="no caption"):
    retrieval.recall_at_k(e, e, np.array([0, 0, 1]))
  with pytest.raises(ValueError, match="differ in width"):
    retrieval.recall_at_k(e, e[:, :2], np.array([0, 1, 2]))
  bad = e.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    retrieval.recall_at_k(bad, e, np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="must lie"):
    retrieval.recall_at_k(e, e, np.array([0, 1, 3]))


# -------------------------------------------------------------- linear probe


def _blobs(rng, n_per_class, n_classes, d, spread):
  means = rng.normal(size=(n_classes, d)) * spread
  y = np.repeat(np.arange(n_classes), n_per_class)
  x = means[y] + rng.normal(size=(len(y), d))
  perm = rng.permutation(len(y))
  return x[perm].astype(np.float32), y[perm]


def test_train_logreg_matches_sklearn():
  rng = np.random.default_rng(3)
  x, y = _blobs(rng, 60, 4, 10, spread=0.7)  # overlapping: unique optimum
  l2 = 0.02
  w, b = linear_probe.train_logreg(jnp.asarray(x), jnp.asarray(y, jnp.int32),
                                   jnp.float32(l2), num_classes=4)
  # sklearn: 0.5||W||^2 + C * sum CE  ==  (mean CE + l2/2 ||W||^2) * n * C.
  ref = LogisticRegression(C=1.0 / (len(y) * l2), tol=1e-10, max_iter=10000)
  ref.fit(x.astype(np.float64), y)
  logits = x @ np.asarray(w) + np.asarray(b)
  prob = np.exp(logits - logits.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  np.testing.assert_allclose(prob, ref.predict_proba(x), atol=1e-4)
  np.testing.assert_allclose(np.asarray(w), ref.coef_.T, atol=1e-3)


def _split(x, y):
  n = len(y)
  a, b = int(0.4 * n), int(0.6 * n)
  return x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:]


def test_linear_probe_separable_reaches_099():
  rng = np.random.default_rng(4)
  x, y = _blobs(rng, 100, 5, 16, spread=4.0)
  out = linear_probe.fit_and_score(*_split(x, y))
  assert out["test_acc"] >= 0.99, out
  assert out["val_acc"] >= 0.99, out
  assert set(out) == {"test_acc", "val_acc", "trainval_acc", "l2"}
  # Separable data favours the weakest l2; refinement must stay in the grid.
  assert 1e-6 * (1 - 1e-6) <= out["l2"] <= 10.0


def test_linear_probe_shuffled_labels_near_chance():
  # 10 balanced classes, labels permuted over the pool, so test labels are
  # independent of the features: accuracy ~ Binomial(n_test=1000, 0.1)/n,
  # std 0.0095. |acc - 0.1| < 0.06 is > 6 std, and a probe that leaked or
  # memorised labels would be far outside it.
  rng = np.random.default_rng(5)
  x, y = _blobs(rng, 250, 10, 16, spread=4.0)
  y = rng.permutation(y)
  out = linear_probe.fit_and_score(*_split(x, y), refine_steps=1)
  assert abs(out["test_acc"] - 0.1) < 0.06, out


def test_sweep_is_coarse_then_fine():
  rng = np.random.default_rng(6)
  x, y = _blobs(rng, 40, 3, 8, spread=0.8)
  tx, ty, vx, vy, _, _ = _split(x, y)
  grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
  table = linear_probe.sweep(tx, ty, vx, vy, l2_grid=grid, refine_steps=2)
  tried = sorted(t[0] for t in table)
  assert len(tried) == 5 + 2 * 2  # the best is interior on this data
  assert 1e-4 - 1e-12 <= tried[0] and tried[-1] <= 1.0 + 1e-9
  for g in grid:
    assert any(np.isclose(g, t) for t in tried)
  # The sweep's ranking is by val accuracy, then val cross-entropy.
  keys = [(-acc, loss) for _, acc, loss in table]
  assert keys == sorted(keys)
  # Refined points lie within half a decade of the best coarse point.
  coarse = [t for t in table if any(np.isclose(t[0], g) for g in grid)]
  best_coarse = min(coarse, key=lambda t: (-t[1], t[2]))[0]
  for l2 in tried:
    if not any(np.isclose(l2, g) for g in grid):
      assert abs(np.log10(l2) - np.log10(best_coarse)) <= 0.5 + 1e-9


def test_strictly_correct_counts_ties_as_wrong():
  logits = jnp.array([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, 3.0]])
  got = linear_probe.strictly_correct(logits, jnp.array([0, 0, 2]))
  np.testing.assert_array_equal(np.asarray(got), [False, True, False])


# ------------------------------------------------------------------ few-shot


def test_sample_episodes_protocol():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 12, 600)
  labels[:3] = 99  # a class too small to ever be drawn
  s, q = few_shot.sample_episodes(labels, 5, 4, 6, episodes=20, seed=1)
  assert s.shape == (20, 20) and q.shape == (20, 30)
  for e in range(20):
    assert len(set(s[e]) | set(q[e])) == 50  # all distinct
    sl = labels[s[e]].reshape(5, 4)
    ql = labels[q[e]].reshape(5, 6)
    assert (sl == sl[:, :1]).all() and (ql == sl[:, :1]).all()
    assert len(set(sl[:, 0])) == 5 and 99 not in sl
  s2, q2 = few_shot.sample_episodes(labels, 5, 4, 6, episodes=20, seed=1)
  np.testing.assert_array_equal(s, s2)
  np.testing.assert_array_equal(q, q2)
  with pytest.raises(ValueError, match="only 0 classes"):
    few_shot.sample_episodes(labels, 5, 100, 15, episodes=1, seed=0)


def test_few_shot_separable_and_matches_sklearn_head():
  rng = np.random.default_rng(8)
  x, y = _blobs(rng, 40, 10, 32, spread=3.0)
  out = few_shot.evaluate(x, y, n_way=5, k_shot=5, n_query=15, episodes=30,
                          seed=0, episode_batch=16, return_episode_accs=True)
  assert out["acc"] >= 0.99, out
  accs = out["episode_accs"]
  assert accs.shape == (30,)
  assert out["acc"] == pytest.approx(np.mean(accs))
  assert out["ci95"] == pytest.approx(
      1.96 * np.std(accs, ddof=1) / np.sqrt(30))

  # The vmapped head against sklearn on hard (overlapping) episodes.
  x, y = _blobs(rng, 40, 10, 32, spread=0.25)
  l2 = 1e-2
  # Same (16-episode) batch shape as above: reuses the compiled solver.
  out = few_shot.evaluate(x, y, episodes=16, seed=3, l2=l2, episode_batch=16,
                          return_episode_accs=True)
  s, q = few_shot.sample_episodes(y, 5, 5, 15, episodes=16, seed=3)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  for e in range(4):
    sy = np.repeat(np.arange(5), 5)
    qy = np.repeat(np.arange(5), 15)
    ref = LogisticRegression(C=1.0 / (len(sy) * l2), tol=1e-10, max_iter=10000)
    ref.fit(xn[s[e]].astype(np.float64), sy)
    ref_acc = np.mean(ref.predict(xn[q[e]]) == qy)
    assert ref_acc < 0.95  # genuinely hard, so agreement means something
    # Allow one query to flip on a near-tie between the two solvers.
    assert abs(out["episode_accs"][e] - ref_acc) <= 1 / 75 + 1e-9


def test_few_shot_shuffled_labels_near_chance():
  # Labels permuted over the pool: queries' labels are independent of their
  # features, so each of the 100 x 75 predictions is right with prob 1/5.
  # Independent predictions would give std 0.0046 for the mean; within an
  # episode they share a head, which widens that, but the reported ci95
  # (from the spread across episodes) stays ~0.01. |acc - 0.2| < 0.05 is
  # then several times wider than any plausible fluctuation.
  rng = np.random.default_rng(9)
  x, y = _blobs(rng, 40, 10, 32, spread=3.0)
  y = rng.permutation(y)
  out = few_shot.evaluate(x, y, episodes=100, seed=0, episode_batch=50)
  assert abs(out["acc"] - 0.2) < 0.05, out
  assert out["ci95"] < 0.03, out
