"""Layer-wise lr decay (`optimizer.layer_decay`, florax/train/layer_decay.py).

1. The per-param multipliers of hand-built trees (the naming spec of the
   shared encoder: ViT and text towers, scanned and not) and of the real
   CoSwin / ViT / Florence two-tower trees (jax.eval_shape) equal BEiT's
   rule decay ** (L + 1 - layer), computed here by a naive loop over flat
   names written from the spec; each slice of a scanned array gets its own.
   BEiT-3's Multiway (bare, and as `multiway/` beside a head) follows
   unilm's beit3 rule (embeddings 0, block i -> i + 1, final norms L + 1);
   a `block{i}` elsewhere claims no tower.
2. Two adamw steps: every update with layer_decay=d is its update with
   layer_decay=1 times the expected multiplier (to 1e-6), weight decay
   included, scanned slices each with their own.
3. layer_decay=1.0 builds the optimizer of before (same state tree and the
   same updates as a chain of clip + adamw built here); any decay keeps
   that state tree.
4. Bad values and a model without encoder layers are clear ValueErrors.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from florax.train import layer_decay
from florax.train import optimizer as opt_lib

# -- the reference: BEiT's rule by a naive loop over flat names -------------

EMBED = {"patch_embed", "cls_token", "reg_token", "mask_token", "pos_embed",
         "token_embed", "norm_pre", "stem"}
PREFIX = r"^((?:[^/]+/)*?)"  # whole path components before the encoder


def flat_shapes(params):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    out["/".join(str(k.key) for k in path)] = tuple(leaf.shape)
  return out


def reference(flat, decay):
  """{name: multiplier broadcast to the param's shape}."""
  depth, stages = {}, {}
  for name, shape in flat.items():
    if m := re.match(PREFIX + r"encoder/block(\d+)/", name):
      depth[m[1]] = max(depth.get(m[1], 0), int(m[2]) + 1)
    elif m := re.match(PREFIX + r"encoder/blocks/", name):
      depth[m[1]] = shape[0]
    elif m := re.match(PREFIX + r"stage(\d+)_block(\d+)/", name):
      st = stages.setdefault(m[1], {})
      st[int(m[2])] = max(st.get(int(m[2]), 0), int(m[3]) + 1)
    elif m := re.match(PREFIX + r"stage(\d+)_pairs/", name):
      stages.setdefault(m[1], {})[int(m[2])] = 2 * shape[0]
  for prefix, st in stages.items():
    depth[prefix] = sum(st.values())
  out = {}
  for name, shape in flat.items():
    owner = [p for p in depth if name.startswith(p)]
    if not owner:
      out[name] = np.ones(shape)
      continue
    p = max(owner, key=len)
    big_l, rest = depth[p], name[len(p):]
    first_of = lambda s: sum(v for k, v in stages[p].items() if k < s)
    if m := re.match(r"encoder/block(\d+)/", rest):
      lid = int(m[1]) + 1
    elif rest.startswith("encoder/blocks/"):
      lid = np.arange(shape[0]) + 1
    elif m := re.match(r"stage(\d+)_block(\d+)/", rest):
      lid = first_of(int(m[1])) + int(m[2]) + 1
    elif m := re.match(r"stage(\d+)_pairs/(plain|shifted)/", rest):
      lid = (first_of(int(m[1])) + 2 * np.arange(shape[0])
             + (m[2] == "shifted") + 1)
    elif rest.split("/")[0] in EMBED:
      lid = 0
    elif m := re.match(r"merge(\d+)/", rest):  # the previous stage's last
      lid = first_of(int(m[1]))
    else:
      lid = big_l + 1
    mult = np.array([decay ** (big_l + 1 - i)
                     for i in np.atleast_1d(lid)], np.float64)
    if np.ndim(lid) == 0:
      out[name] = np.full(shape, mult[0])
    else:
      out[name] = np.broadcast_to(
          mult.reshape((-1,) + (1,) * (len(shape) - 1)), shape)
  return out


def computed(params, decay):
  """{name: the module's multiplier broadcast to the param's shape}."""
  scales = layer_decay.multipliers(params, decay)
  flat = flat_shapes(params)
  assert len(scales) == len(flat)
  return {name: np.broadcast_to(1.0 if s is None else np.asarray(s), shape)
          for (name, shape), s in zip(flat.items(), scales)}


def check_against_reference(params, decay):
  ref, got = reference(flat_shapes(params), decay), computed(params, decay)
  assert set(ref) == set(got)
  for name in ref:
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, err_msg=name)
  return ref


# -- trees ------------------------------------------------------------------

def sds(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def spec_block(d=8, h=2, hd=4, f=16, lead=()):
  """One encoder block of the naming spec (BEiT-style options on)."""
  s = lambda *shape: sds(*lead, *shape)
  return {
      "norm1": {"scale": s(d), "bias": s(d)},
      "attn": {"qkv": {"kernel": s(d, 3, h, hd)}, "q_bias": s(h, hd),
               "v_bias": s(h, hd), "proj": {"kernel": s(h, hd, d),
                                            "bias": s(d)},
               "relative_position_bias": s(12, h)},
      "ls1": s(d), "ls2": s(d),
      "norm2": {"scale": s(d), "bias": s(d)},
      "mlp": {"fc1": {"kernel": s(d, f), "bias": s(f)},
              "fc2": {"kernel": s(f, d), "bias": s(d)}}}


def spec_two_tower(image_depth=3, text_depth=4):
  """image_encoder: a ViT of `image_depth` unscanned blocks; text_encoder:
  a scanned text tower of `text_depth` layers; projections, temperature
  and a head outside both."""
  image = {"patch_embed": {"kernel": sds(2, 2, 3, 8), "bias": sds(8)},
           "cls_token": sds(1, 1, 8), "pos_embed": sds(5, 8),
           "norm_pre": {"scale": sds(8), "bias": sds(8)},
           "encoder": {f"block{i}": spec_block() for i in range(image_depth)},
           "fc_norm": {"scale": sds(8), "bias": sds(8)}}
  image["encoder"]["relative_position_bias"] = sds(12, 2)  # "shared"
  text = {"token_embed": {"embedding": sds(10, 8)}, "pos_embed": sds(6, 8),
          "encoder": {"blocks": {"block": spec_block(lead=(text_depth,))}},
          "norm": {"scale": sds(8), "bias": sds(8)}}
  return {"image_encoder": image, "text_encoder": text,
          "image_proj": {"kernel": sds(8, 4)},
          "text_proj": {"kernel": sds(8, 4)}, "logit_scale": sds(),
          "head": {"kernel": sds(8, 3), "bias": sds(3)}}


def coswin_tree(scan, depths=(2, 2)):
  from florax.models import coswin
  cfg = coswin.CoSwinConfig(**{**coswin.PRESETS["tiny"], "scan": scan,
                               "depths": depths})
  model = coswin.CoSwin(cfg)
  return nn.unbox(jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, 32, 32, 3))),
      jax.random.key(0))["params"])


def vit_tree(scan):
  from florax.models import vit
  cfg = vit.ViTConfig(image_size=8, patch_size=4, width=8, depth=3,
                      num_heads=2, mlp_dim=16, pre_norm=True, pool="mean",
                      fc_norm=True, qkv_bias="qv", layer_scale=0.1,
                      rel_pos_bias="shared", scan=scan)
  model = vit.ViT(cfg)
  return nn.unbox(jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, 8, 8, 3))),
      jax.random.key(0))["params"])


def florence_tiny_tree(scan):
  from configs import florence
  from florax.models import two_tower
  cfg = florence.get_config("tiny")
  cfg.model.image.scan = scan
  cfg.model.text.scan = scan
  model = two_tower.from_config(cfg.model)
  s, length = cfg.data.image_size, cfg.data.max_len
  return nn.unbox(jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, s, s, 3)),
                           jnp.zeros((1, length), jnp.int32)),
      jax.random.key(0))["params"])


# -- 1. multipliers ---------------------------------------------------------

def test_spec_tree_multipliers_follow_beit():
  params = spec_two_tower(image_depth=3, text_depth=4)
  ref = check_against_reference(params, 0.5)
  # The rule's landmarks, from the formula by hand: 3 image layers, 4 text.
  assert ref["image_encoder/cls_token"].flat[0] == 0.5 ** 4
  assert ref["image_encoder/encoder/block0/ls1"].flat[0] == 0.5 ** 3
  assert ref["image_encoder/encoder/block2/ls1"].flat[0] == 0.5 ** 1
  assert ref["image_encoder/fc_norm/scale"].flat[0] == 1.0
  assert ref["text_encoder/token_embed/embedding"].flat[0] == 0.5 ** 5
  np.testing.assert_array_equal(
      ref["text_encoder/encoder/blocks/block/ls1"][:, 0],
      [0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5 ** 1])
  for name in ("image_proj/kernel", "logit_scale", "head/bias",
               "image_encoder/encoder/relative_position_bias"):
    assert (ref[name] == 1.0).all(), name
  towers = layer_decay.find_towers(params)
  assert [(t.prefix, t.depth) for t in towers] == [
      (("image_encoder",), 3), (("text_encoder",), 4)]


def test_bare_encoder_at_the_root():
  params = {"patch_embed": {"kernel": sds(2, 2, 3, 8)}, "pos_embed": sds(4, 8),
            "encoder": {"blocks": {"block": spec_block(lead=(5,))}},
            "norm": {"scale": sds(8)}}
  check_against_reference(params, 0.8)


@pytest.mark.parametrize("scan", [False, True])
def test_coswin_multipliers(scan):
  params = coswin_tree(scan, depths=(4, 2))
  names = flat_shapes(params)
  assert any(("_pairs/" if scan else "_block3/") in n for n in names)
  ref = check_against_reference(params, 0.7)
  # 4 + 2 blocks: stem 0, stage0 1-4, merge1 4, stage1 5-6, norm 7.
  assert np.isclose(ref["stem/conv/kernel"].flat[0], 0.7 ** 7)
  assert np.isclose(ref["merge1/conv/kernel"].flat[0], 0.7 ** 3)
  assert ref["norm/scale"].flat[0] == 1.0


@pytest.mark.parametrize("scan", [False, True])
def test_vit_multipliers(scan):
  check_against_reference(vit_tree(scan), 0.65)


@pytest.mark.parametrize("scan", [False, True])
def test_florence_two_tower_counts_each_tower(scan):
  params = florence_tiny_tree(scan)
  check_against_reference(params, 0.75)
  towers = {t.prefix: t.depth for t in layer_decay.find_towers(params)}
  assert towers == {("image_encoder",): 4, ("text_encoder",): 2}


# -- 1b. BEiT-3 Multiway ----------------------------------------------------

def multiway_tree(caption_model=False):
  """The tiny Multiway's params (init with images AND text: every param);
  caption_model: wrapped as `multiway/` beside `mlm_head/`."""
  from florax.models import multiway
  cfg = multiway.config_for("tiny")
  model = (multiway.CaptionModel if caption_model else multiway.Multiway)(cfg)
  return nn.unbox(jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((2, 32, 32, 3)),
                           jnp.zeros((2, 16), jnp.int32)),
      jax.random.key(0))["params"])


def multiway_expected(name, prefix, depth, decay):
  """unilm beit3's get_num_layer_for_vit, by hand: the embeddings are layer
  0, encoder layer i is i + 1, all else (final norms, anything beside the
  backbone) L + 1; multiplier decay ** (L + 1 - layer)."""
  if not name.startswith(prefix):
    return 1.0
  top = name[len(prefix):].split("/")[0]
  if top in ("vision_embed", "text_embed"):
    return decay ** (depth + 1)
  if m := re.fullmatch(r"block(\d+)", top):
    return decay ** (depth - int(m[1]))
  return 1.0


@pytest.mark.parametrize("wrapped", ["bare", "caption", "vqa"])
def test_multiway_multipliers_follow_beit3(wrapped):
  params = multiway_tree(caption_model=wrapped == "caption")
  if wrapped == "vqa":  # a task's layout: the backbone beside pooler, head
    params = {"multiway": params,
              "pooler": {"norm": {"scale": sds(64)},
                         "dense": {"kernel": sds(64, 64)}},
              "head": {"dense1": {"kernel": sds(64, 128)},
                       "dense2": {"kernel": sds(128, 10)}}}
  prefix = "" if wrapped == "bare" else "multiway/"
  got = computed(params, 0.5)
  for name, mult in got.items():
    np.testing.assert_array_equal(
        mult, multiway_expected(name, prefix, 3, 0.5), err_msg=name)
  # Landmarks written out (3 layers, decay 0.5): embeddings 0.5 ** 4.
  want = {"vision_embed/cls_token": 0.0625, "vision_embed/mask_token": 0.0625,
          "vision_embed/pos_embed": 0.0625,
          "vision_embed/patch_embed/kernel": 0.0625,
          "text_embed/pos_embed": 0.0625,
          "text_embed/token_embed/embedding": 0.0625,
          "block0/attn/qkv/kernel": 0.125, "block0/mlp_l/fc1/kernel": 0.125,
          "block1/norm1_v/scale": 0.25, "block1/mlp_v/norm/scale": 0.25,
          "block2/mlp_vl/fc2/kernel": 0.5, "block2/norm2_vl/bias": 0.5,
          "norm_v/scale": 1.0, "norm_l/bias": 1.0}
  for name, value in want.items():
    assert got[prefix + name].flat[0] == value, name
  assert sum(m.flat[0] == 0.0625 for m in got.values()) == 7
  outside = [n for n in got if not n.startswith(prefix)]
  assert all((got[n] == 1.0).all() for n in outside)
  assert [(t.prefix, t.kind, t.depth)
          for t in layer_decay.find_towers(params)] == [
              (tuple(prefix.split("/")[:-1]), "multiway", 3)]


def test_multiway_named_encoder_is_a_multiway():
  # Not the shared encoder's `encoder/block{i}`: its embeddings are inside.
  params = {"encoder": multiway_tree(), "head": {"kernel": sds(64, 2)}}
  got = computed(params, 0.5)
  assert got["encoder/vision_embed/cls_token"].flat[0] == 0.0625
  assert got["encoder/text_embed/pos_embed"].flat[0] == 0.0625
  assert got["encoder/block1/attn/qkv/kernel"].flat[0] == 0.25
  assert got["encoder/norm_v/scale"].flat[0] == 1.0
  assert [(t.prefix, t.kind) for t in layer_decay.find_towers(params)] == [
      (("encoder",), "multiway")]


def test_generic_block_names_claim_no_tower():
  # block{i} beside other names than vision_embed/text_embed (a decoder with
  # a token embedding, a bare stack) is not a Multiway: the ViT tower keeps
  # its depth and the rest trains at the full lr (the spec's reference).
  fc = {"mlp": {"fc1": {"kernel": sds(8, 16)}}}
  params = spec_two_tower(image_depth=3, text_depth=2)
  params["decoder"] = {"token_embed": {"embedding": sds(10, 8)},
                       "block0": fc, "block1": fc}
  params["stack"] = {"block0": fc, "block7": fc}
  ref = check_against_reference(params, 0.5)
  assert (ref["decoder/block1/mlp/fc1/kernel"] == 1.0).all()
  assert (ref["decoder/token_embed/embedding"] == 1.0).all()
  assert [(t.prefix, t.kind, t.depth)
          for t in layer_decay.find_towers(params)] == [
              (("image_encoder",), "transformer", 3),
              (("text_encoder",), "transformer", 2)]
  with pytest.raises(ValueError, match="no recognizable encoder layers"):
    layer_decay.multipliers({"decoder": params["decoder"]}, 0.5)


# -- 2. one optimizer, two settings -----------------------------------------

def opt_config(decay):
  cfg = common.base_config().optimizer
  cfg.warmup_steps = 0
  cfg.learning_rate = 1e-2
  cfg.weight_decay = 0.1
  cfg.layer_decay = decay
  return cfg


def small_tree():
  """Few leaves (the step compiles fast) of all three block layouts: an
  unscanned and a scanned encoder and a scanned CoSwin, with embeddings,
  a merge, norms and heads."""
  fc = lambda *lead: {"mlp": {"fc1": {"kernel": sds(*lead, 4, 4),
                                      "bias": sds(*lead, 4)}}}
  return {
      "image_encoder": {"cls_token": sds(1, 1, 4),
                        "patch_embed": {"kernel": sds(2, 2, 3, 4)},
                        "encoder": {"block0": fc(), "block1": fc()},
                        "norm": {"scale": sds(4)}},
      "text_encoder": {"token_embed": {"embedding": sds(6, 4)},
                       "encoder": {"blocks": {"block": fc(3)}}},
      "swin": {"stem": {"conv": {"kernel": sds(3, 3, 3, 4)}},
               "stage0_pairs": {"plain": fc(2), "shifted": fc(2)},
               "merge1": {"conv": {"kernel": sds(3, 3, 4, 4)}},
               "stage1_block0": fc(), "stage1_block1": fc()},
      "head": {"kernel": sds(4, 2)}, "logit_scale": sds()}


def random_like(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract)


def updates_of(tx, params, grads_seq):
  """The updates of len(grads_seq) steps at fixed params (one compile)."""
  def run(params, grads_seq):
    state = tx.init(params)
    out = []
    for g in grads_seq:
      u, state = tx.update(g, state, params)
      out.append(u)
    return out
  return jax.jit(run)(params, grads_seq)


def test_small_tree_multipliers_follow_beit():
  check_against_reference(small_tree(), 0.6)


def test_updates_are_scaled_per_layer():
  abstract = small_tree()
  params = random_like(abstract, 0)
  grads = [random_like(abstract, 1), random_like(abstract, 2)]
  decay = 0.6
  tx1, _ = opt_lib.build_optimizer(opt_config(1.0), 100, params)
  txd, _ = opt_lib.build_optimizer(opt_config(decay), 100, params)
  ref = reference(flat_shapes(params), decay)
  scanned = 0
  for u1, ud in zip(updates_of(tx1, params, grads),
                    updates_of(txd, params, grads)):
    u1, ud = flat_of(u1), flat_of(ud)
    for name, mult in ref.items():
      assert np.abs(u1[name]).max() > 0, name
      np.testing.assert_allclose(ud[name], u1[name] * mult, rtol=1e-6,
                                 atol=1e-12, err_msg=name)
      if mult.ndim and len(np.unique(mult)) == mult.shape[0] > 1:
        scanned += 1  # every slice along axis 0 its own multiplier
  assert scanned == 2 * 6  # 2 steps x (text fc1 2 + 2 CoSwin halves x 2)


def flat_of(tree):
  return {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# -- 3. off = the optimizer of before ---------------------------------------

def test_off_is_the_optimizer_of_before_and_state_never_changes():
  params = random_like(small_tree(), 0)
  cfg = opt_config(1.0)
  schedule = opt_lib.learning_rate_schedule(cfg, 100)
  before = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay,
                  mask=opt_lib.decay_mask(params, cfg.no_decay_patterns)))
  want = jax.eval_shape(before.init, params)
  for decay in (1.0, 0.8):
    tx, _ = opt_lib.build_optimizer(opt_config(decay), 100, params)
    got = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
  tx, _ = opt_lib.build_optimizer(cfg, 100, params)
  grads = [random_like(params, 1)]
  jax.tree.map(np.testing.assert_array_equal,
               updates_of(tx, params, grads), updates_of(before, params, grads))
  # A config from before the field existed: no decay, no error.
  del cfg["layer_decay"]
  opt_lib.build_optimizer(cfg, 100, params)
  assert common.base_config().optimizer.layer_decay == 1.0


# -- 4. errors --------------------------------------------------------------

BAD_VALUE = r"optimizer\.layer_decay must be a number in \(0, 1\]"


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_bad_value_is_refused(bad):
  with pytest.raises(ValueError, match=BAD_VALUE):
    opt_lib.build_optimizer(opt_config(bad), 100, spec_two_tower())


@pytest.mark.parametrize("bad", [True, "0.8", None])
def test_bad_type_is_refused(bad):
  # A ConfigDict keeps the float type of the field; a dict-built config or a
  # direct caller may not.
  with pytest.raises(ValueError, match=BAD_VALUE):
    layer_decay.check_value(bad)


def test_model_without_layers_is_refused_only_when_decaying():
  params = {"dense": {"kernel": sds(4, 4), "bias": sds(4)}}
  with pytest.raises(ValueError, match=r"layer_decay=0\.8 .* no recognizable "
                     r"encoder layers.*\['dense'\]"):
    opt_lib.build_optimizer(opt_config(0.8), 100, params)
  opt_lib.build_optimizer(opt_config(1.0), 100, params)
