"""Per-param lr multipliers (`optimizer.lr_multipliers`,
florax/train/layer_decay.py `lr_scales`, applied by build_optimizer).

1. The per-leaf scales of small trees equal hand-written expectations: the
   first matching pattern's factor, 1.0 where none matches, times the
   layer-decay multiplier (each slice of a scanned array its own).
2. One adamw step: with (('head', 20),) the head's update is exactly 20x
   the update of the same optimizer without the field, every other update
   is unchanged, and so is the optimizer state tree; a config without the
   field (an older run's config.json) is the optimizer without it.
3. Malformed values, bad regexes and factors, patterns that set no param
   are ValueErrors naming the field, raised before anything compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from florax.train import layer_decay
from florax.train import optimizer as opt_lib


def sds(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def tree():
  """A 2-layer encoder (unscanned) beside a pooler and a head."""
  fc = lambda *lead: {"fc": {"kernel": sds(*lead, 4, 4), "bias": sds(*lead,
                                                                    4)}}
  return {"backbone": {"cls_token": sds(1, 1, 4),
                       "encoder": {"block0": fc(), "block1": fc()},
                       "norm": {"scale": sds(4)}},
          "pooler": {"kernel": sds(4, 4)},
          "head": {"kernel": sds(4, 3), "bias": sds(3)}}


def scanned_tree():
  return {"backbone": {"cls_token": sds(1, 1, 4),
                       "encoder": {"blocks": {"block": {
                           "fc": {"kernel": sds(3, 4, 4)}}}}},
          "head": {"kernel": sds(4, 3)}}


def flat_names(params):
  return ["/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def scales_by_name(params, decay, lr_multipliers):
  got = layer_decay.lr_scales(params, decay, lr_multipliers)
  names = flat_names(params)
  assert len(got) == len(names)
  return {n: 1.0 if s is None else s for n, s in zip(names, got)}


# -- 1. the scales ----------------------------------------------------------

def test_first_matching_pattern_wins():
  got = scales_by_name(tree(), 1.0, (("^head/kernel$", 20.0),
                                     ("^head/", 10), ("pooler", 2.5)))
  assert got == {"backbone/cls_token": 1.0,
                 "backbone/encoder/block0/fc/bias": 1.0,
                 "backbone/encoder/block0/fc/kernel": 1.0,
                 "backbone/encoder/block1/fc/bias": 1.0,
                 "backbone/encoder/block1/fc/kernel": 1.0,
                 "backbone/norm/scale": 1.0,
                 "head/bias": 10.0, "head/kernel": 20.0,
                 "pooler/kernel": 2.5}


def test_none_is_all_ones_and_needs_no_layers():
  # decay 1 and no multipliers: nothing to scale, and a tree without
  # encoder layers is fine (as before the field existed).
  assert layer_decay.lr_scales(tree(), 1.0, ()) == [None] * 9
  assert layer_decay.lr_scales({"w": sds(2, 2)}, 1.0, [["w", 3]]) == [3.0]


def test_composes_with_layer_decay():
  # L = 2, decay 0.5: cls_token 0.5 ** 3, block0 0.5 ** 2, block1 0.5, the
  # final norm, pooler and head 1; then the factors on top.
  got = scales_by_name(tree(), 0.5, (("block1/fc/kernel", 3.0),
                                     ("^head/", 20.0), ("cls_token", 4.0)))
  assert got == {"backbone/cls_token": 0.5,  # 0.125 x 4
                 "backbone/encoder/block0/fc/bias": 0.25,
                 "backbone/encoder/block0/fc/kernel": 0.25,
                 "backbone/encoder/block1/fc/bias": 0.5,
                 "backbone/encoder/block1/fc/kernel": 1.5,
                 "backbone/norm/scale": 1.0,
                 "head/bias": 20.0, "head/kernel": 20.0,
                 "pooler/kernel": 1.0}


def test_composes_with_a_scanned_layer_axis():
  got = scales_by_name(scanned_tree(), 0.5, (("blocks", 10.0),))
  # 3 stacked layers: 0.5 ** 3, 0.5 ** 2, 0.5, each x 10, along axis 0.
  kernel = np.broadcast_to(got["backbone/encoder/blocks/block/fc/kernel"],
                           (3, 4, 4))
  np.testing.assert_allclose(kernel[:, 0, 0], [1.25, 2.5, 5.0], rtol=1e-7)
  assert (kernel == kernel[:, :1, :1]).all()
  assert got["backbone/cls_token"] == 0.0625
  assert got["head/kernel"] == 1.0


# -- 2. one optimizer step --------------------------------------------------

def opt_config(lr_multipliers=(), decay=1.0):
  cfg = common.base_config().optimizer
  cfg.warmup_steps = 0
  cfg.learning_rate = 1e-2
  cfg.weight_decay = 0.1  # on the kernels: the factor must scale it too
  cfg.layer_decay = decay
  cfg.lr_multipliers = lr_multipliers
  return cfg


def random_like(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract)


def one_update(cfg, params, grads):
  tx, _ = opt_lib.build_optimizer(cfg, 100, params)

  def step(params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates
  flat = jax.tree_util.tree_flatten_with_path(
      jax.jit(step)(params, grads))[0]
  return {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in flat}, jax.eval_shape(tx.init, params)


def test_one_step_head_is_20x_and_state_tree_unchanged():
  params = random_like(tree(), 0)
  grads = random_like(tree(), 1)
  plain, plain_state = one_update(opt_config(), params, grads)
  head, head_state = one_update(opt_config((("head", 20),)), params, grads)
  assert set(plain) == set(head)
  for name in plain:
    assert np.abs(plain[name]).max() > 0, name
    factor = 20.0 if name.startswith("head/") else 1.0
    np.testing.assert_allclose(head[name], factor * plain[name], rtol=1e-6,
                               err_msg=name)
  # The state (what a checkpoint holds) is the same tree, leaf for leaf.
  assert jax.tree.structure(head_state) == jax.tree.structure(plain_state)
  assert jax.tree.leaves(head_state) == jax.tree.leaves(plain_state)


def test_one_step_with_layer_decay_and_multipliers():
  params = random_like(tree(), 0)
  grads = random_like(tree(), 1)
  plain, plain_state = one_update(opt_config(), params, grads)
  both, both_state = one_update(
      opt_config((("^head/", 20.0), ("block1", 3.0)), decay=0.5), params,
      grads)
  want = {"backbone/cls_token": 0.125, "backbone/norm/scale": 1.0,
          "backbone/encoder/block0/fc/bias": 0.25,
          "backbone/encoder/block0/fc/kernel": 0.25,
          "backbone/encoder/block1/fc/bias": 1.5,
          "backbone/encoder/block1/fc/kernel": 1.5,
          "pooler/kernel": 1.0, "head/bias": 20.0, "head/kernel": 20.0}
  assert set(want) == set(plain)
  for name, factor in want.items():
    np.testing.assert_allclose(both[name], factor * plain[name], rtol=1e-6,
                               err_msg=name)
  assert jax.tree.structure(both_state) == jax.tree.structure(plain_state)


def test_config_without_the_field_is_off():
  params = random_like(tree(), 0)
  grads = random_like(tree(), 1)
  cfg = opt_config()
  del cfg["lr_multipliers"]  # an older run's config.json
  old, old_state = one_update(cfg, params, grads)
  plain, plain_state = one_update(opt_config(), params, grads)
  for name in plain:
    np.testing.assert_array_equal(old[name], plain[name], err_msg=name)
  assert jax.tree.structure(old_state) == jax.tree.structure(plain_state)
  assert common.base_config().optimizer.lr_multipliers == ()


# -- 3. refusals ------------------------------------------------------------

FIELD = r"config\.optimizer\.lr_multipliers"


@pytest.mark.parametrize("bad, match", [
    ((("(head", 2.0),), r"'\(head' is not a regular expression"),
    ((("head", 0.0),), r"factor of 'head' must be a positive finite"),
    ((("head", -2.0),), r"factor of 'head' must be a positive finite"),
    ((("head", float("nan")),), r"factor of 'head' must be a positive"),
    ((("head", float("inf")),), r"factor of 'head' must be a positive"),
    ((("head", "20"),), r"factor of 'head' must be a positive finite"),
    ((("head", True),), r"factor of 'head' must be a positive finite"),
    ((("head", None),), r"factor of 'head' must be a positive finite"),
    (("head", 20.0), r"bare pair \('head', 20\.0\): write \(\('head', "
     r"20\.0\),\)"),
    ((("head",),), r"\(pattern, factor\) pairs.*entry 0 is \('head',\)"),
    ((("head", 2.0, 3.0),), r"entry 0 is \('head', 2\.0, 3\.0\)"),
    ((("head", 2.0), "pooler"), r"entry 1 is 'pooler'"),
    (((3, 2.0),), r"entry 0's pattern must be a string"),
    ("head", r"\(pattern, factor\) pairs.*got 'head'"),
    ({"head": 20.0}, r"\(pattern, factor\) pairs.*got \{'head': 20\.0\}"),
    (None, r"\(pattern, factor\) pairs.*got None"),
])
def test_malformed_values_are_refused(bad, match):
  with pytest.raises(ValueError, match=FIELD + r".*" + match):
    layer_decay.check_lr_multipliers(bad)


def test_refused_by_build_optimizer_before_compiling():
  # Through the config (tuple-typed there), as a run would see them.
  with pytest.raises(ValueError, match=FIELD + r": '\[' is not a regular"):
    opt_lib.build_optimizer(opt_config((("[", 2.0),)), 100, tree())
  with pytest.raises(ValueError, match=FIELD + r": the factor of 'head'"):
    opt_lib.build_optimizer(opt_config((("head", -1.0),)), 100, tree())


def test_pattern_matching_no_param_is_refused():
  # A typo would otherwise silently train the head at the backbone's lr; the
  # message shows names from each top-level module to fix it against.
  with pytest.raises(ValueError, match=(
      FIELD + r": '\^heads/' matches no parameter \(flat names look like "
      r"\['backbone/cls_token', 'head/bias', 'pooler/kernel'")):
    opt_lib.build_optimizer(opt_config((("^head/", 20.0), ("^heads/", 2.0))),
                            100, tree())


def test_pattern_shadowed_by_an_earlier_one_is_refused():
  with pytest.raises(ValueError, match=(
      FIELD + r": 'head/kernel' only matches parameters that the earlier "
      r"pattern\(s\) \['\^head/'\] already set")):
    layer_decay.pattern_factors(tree(), (("^head/", 20.0),
                                         ("head/kernel", 5.0)))
