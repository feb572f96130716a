"""FLAVA round-robin ratios and resume; BEiT-3 fixed composition."""

from __future__ import annotations

import collections

import grain
import ml_collections
import numpy as np
import pytest

from florax.data import mixtures


def _counter_iter(offset: int, batch: int = 1):
  ds = grain.MapDataset.range(offset, offset + 1000).repeat()
  return iter(ds.to_iter_dataset().batch(batch))


def test_round_robin_ratios_over_10k_samples():
  weights = {"pairs": 0.5, "images": 0.3, "texts": 0.2}
  mix = mixtures.RoundRobinMixture(
      {"pairs": _counter_iter(0), "images": _counter_iter(10_000),
       "texts": _counter_iter(20_000)}, weights, seed=3)
  counts = collections.Counter()
  for _ in range(10_000):
    out = mix.__next__()
    (name, batch), = out.items()
    counts[name] += 1
    # the batch really came from the named dataset
    assert {"pairs": 0, "images": 1, "texts": 2}[name] == int(batch[0]) // 10_000
  for name, w in weights.items():
    assert abs(counts[name] / 10_000 - w) <= 0.02, (name, counts)


def test_round_robin_resumes_exactly():
  def make():
    return mixtures.RoundRobinMixture(
        {"a": _counter_iter(0, 2), "b": _counter_iter(5000, 2)},
        {"a": 1.0, "b": 3.0}, seed=0)
  it = make()
  for _ in range(17):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(20)]
  resumed = make()
  resumed.set_state(state)
  got = [next(resumed) for _ in range(20)]
  for w, g in zip(want, got):
    assert w.keys() == g.keys()
    (k,) = w
    np.testing.assert_array_equal(w[k], g[k])


def test_fixed_composition_from_config():
  def fake_make(data_cfg):
    return _counter_iter(data_cfg.offset, data_cfg.batch_size)
  cfg = ml_collections.ConfigDict(dict(kind="fixed", seed=0, datasets=dict(
      images=dict(weight=1.0, data=dict(offset=0, batch_size=3)),
      texts=dict(weight=1.0, data=dict(offset=100, batch_size=3)),
      pairs=dict(weight=1.0, data=dict(offset=200, batch_size=3)))))
  it = mixtures.make_mixture_iterator(cfg, make_iterator=fake_make)
  for step in range(5):
    out = next(it)
    assert sorted(out) == ["images", "pairs", "texts"]
    for name, base in (("images", 0), ("texts", 100), ("pairs", 200)):
      np.testing.assert_array_equal(out[name], base + 3 * step + np.arange(3))
  cfg.kind = "nope"
  with pytest.raises(ValueError, match="mixture.kind"):
    mixtures.make_mixture_iterator(cfg, make_iterator=fake_make)
