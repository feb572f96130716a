"""Layer-wise learning-rate decay (BEiT, Bao et al. 2021; EVA fine-tuning).

Fine-tuning a pretrained encoder, the layers near the input hold the most
general features and should move least: with L encoder layers, a param in
layer l trains at lr * decay ** (L + 1 - l), where l = 0 is the embedding
(patch/token embedding, class token, position table, pre-norm, CoSwin's
stem), block i is l = i + 1, and everything after the encoder (final norms,
heads, projections, the temperature) is l = L + 1, i.e. the full lr. Each
tower of a two-tower model counts its own layers. BEiT puts the factor in
the param group's lr, so weight decay is scaled with it; scaling adamw's
final update does exactly that.

Which layer a param belongs to is the model's naming, read here in one place
from the model modules rather than from regexes in the optimizer:
  * the shared encoder (florax/models/transformer.py): its own `layer_of`
    gives `.../encoder/block{i}/...` or the scanned `.../encoder/blocks/...`
    (all layers stacked on axis 0);
  * CoSwin (florax/models/coswin.py): `stage{s}_block{d}`, or scanned
    `stage{s}_pairs/{plain,shifted}` (pair p holds the stage's blocks 2p and
    2p+1), numbered across stages in order; the conv embedding `merge{s}`
    in front of stage s goes with the last block before it (as SimMIM's
    Swin downsample, which ends the previous stage);
  * BEiT-3's Multiway (florax/models/multiway.py): a module whose children
    are `block{i}` AND `vision_embed` and/or `text_embed` (unilm's beit3
    get_num_layer_for_vit: the embeddings are layer 0, encoder layer i is
    i + 1, the per-modality final norms `norm_v`/`norm_l` L + 1). Both kinds
    of child are required, so that a `block{i}` anywhere else (a decoder, a
    head) never claims a tower.
A scanned array gets a multiplier array broadcast along its leading axis, so
each layer still gets its own lr.

`optimizer.lr_multipliers` (`lr_scales`) multiplies the lr of the params
whose flat name matches a pattern (the first that matches) by its factor,
on top of the layer decay: a task head trained at x20 the backbone's lr
(unilm's --task_head_lr_weight for BEiT-3 VQA).

The multipliers are constants of the run, closed over by the update; the
optimizer state is the wrapped optimizer's own, so turning the decay or the
lr multipliers on or off changes no checkpoint structure.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from florax.models import transformer

# Tower-level params before the first block (layer 0). Anything else of a
# tower outside its blocks comes after them (layer L + 1), as in BEiT, where
# a shared relative position bias, the final norm and the head all train at
# the full lr.
EMBEDDING_NAMES = frozenset({
    "patch_embed", "cls_token", "reg_token", "mask_token", "pos_embed",
    "token_embed", "norm_pre", "stem"})

_COSWIN_BLOCK = re.compile(r"stage(\d+)_block(\d+)")
_COSWIN_PAIRS = re.compile(r"stage(\d+)_pairs")
_COSWIN_MERGE = re.compile(r"merge(\d+)")
_COSWIN_PAIR_HALVES = ("plain", "shifted")

# BEiT-3's Multiway: its blocks, and the embeddings (layer 0) whose presence
# beside them is what marks the module as a Multiway.
_MULTIWAY_BLOCK = re.compile(r"block(\d+)")
MULTIWAY_EMBEDDING_NAMES = frozenset({"vision_embed", "text_embed"})

LAYOUTS = ("encoder/block{i} or encoder/blocks (florax.models.transformer: "
           "ViT, text), stage{s}_block{d} or stage{s}_pairs (CoSwin), "
           "block{i} beside vision_embed/text_embed (BEiT-3 Multiway)")

LR_MULTIPLIERS = "config.optimizer.lr_multipliers"


@dataclasses.dataclass(frozen=True)
class Tower:
  """An encoder found in the param tree: `prefix` (path of the tower's
  module, () for a bare encoder), its layout and its number of layers."""
  prefix: tuple[str, ...]
  kind: str  # "transformer" | "coswin" | "multiway"
  depth: int
  stage_offsets: tuple[int, ...] = ()  # CoSwin: blocks before each stage


def _multiway_prefixes(flat) -> frozenset:
  """Paths of the Multiway modules of a flat param list: modules with both
  `block{i}` and `vision_embed`/`text_embed` child modules (a Multiway
  initialised with one input kind has only that kind's embedding)."""
  blocks, embeds = set(), set()
  for parts, _ in flat:
    for k in range(len(parts) - 1):  # child modules only, not leaves
      if _MULTIWAY_BLOCK.fullmatch(parts[k]):
        blocks.add(parts[:k])
      elif parts[k] in MULTIWAY_EMBEDDING_NAMES:
        embeds.add(parts[:k])
  return frozenset(blocks & embeds)


def _locate(parts: tuple[str, ...], multiway: frozenset = frozenset()):
  """(tower prefix, kind, where in the blocks) of the first encoder block a
  flat name is inside, or None. `where`: the encoder's or the Multiway's
  block number or "scanned"; CoSwin's (stage, block) or (stage, "pairs",
  0 plain|1 shifted). `multiway`: the tree's `_multiway_prefixes`.
  """
  for k, part in enumerate(parts):
    if parts[:k] in multiway and (m := _MULTIWAY_BLOCK.fullmatch(part)):
      return parts[:k], "multiway", int(m.group(1))
    # A Multiway that happens to be named `encoder` is not the shared
    # encoder: its embeddings sit inside it, not beside it.
    if part == "encoder" and parts[:k + 1] not in multiway:
      # Asked about these two components only, so that a deeper encoder
      # cannot claim the name.
      layer = transformer.layer_of("/".join(parts[k:k + 2]) + "/")
      if layer is not None:
        return parts[:k], "transformer", layer
    if m := _COSWIN_BLOCK.fullmatch(part):
      return parts[:k], "coswin", (int(m.group(1)), int(m.group(2)))
    if m := _COSWIN_PAIRS.fullmatch(part):
      half = parts[k + 1] if k + 1 < len(parts) else ""
      if half not in _COSWIN_PAIR_HALVES:
        raise ValueError(f"param {'/'.join(parts)!r}: a scanned CoSwin pair "
                         f"holds {_COSWIN_PAIR_HALVES}, not {half!r}")
      return parts[:k], "coswin", (int(m.group(1)), "pairs",
                                   _COSWIN_PAIR_HALVES.index(half))
  return None


def _flat(params) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  """[(name parts, shape)] in the tree's leaf order (params may be
  abstract: only shapes are read)."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    out.append((parts, tuple(getattr(leaf, "shape", np.shape(leaf)))))
  return out


def find_towers(params) -> list[Tower]:
  """The encoders of a param tree, with their depths.

  Raises:
    ValueError: a tower mixes layouts, or its scanned arrays disagree on the
      number of layers.
  """
  flat = _flat(params)
  return _find_towers(flat, _multiway_prefixes(flat))


def _find_towers(flat, multiway: frozenset) -> list[Tower]:
  seen: dict[tuple[str, ...], dict] = {}
  for parts, shape in flat:
    found = _locate(parts, multiway)
    if found is None:
      continue
    prefix, kind, where = found
    info = seen.setdefault(prefix, {"kind": kind, "blocks": set(),
                                    "scanned": {}})
    name = "/".join(parts)
    if info["kind"] != kind:
      raise ValueError(f"param {name!r}: tower {'/'.join(prefix)!r} mixes "
                       f"{info['kind']} and {kind} block names")
    if (kind == "coswin" and where[1] == "pairs") or where == "scanned":
      key = where[0] if kind == "coswin" else None
      if not shape:
        raise ValueError(f"scanned param {name!r} has no layer axis")
      info["scanned"].setdefault(key, set()).add(shape[0])
    else:
      info["blocks"].add(where)
  towers = []
  for prefix, info in seen.items():
    label = "/".join(prefix) or "the model"
    for sizes in info["scanned"].values():
      if len(sizes) > 1:
        raise ValueError(f"scanned params of {label} disagree on the number "
                         f"of layers (leading axis {sorted(sizes)})")
    if info["kind"] == "coswin":
      depths: dict[int, int] = {}
      for s, d in info["blocks"]:
        depths[s] = max(depths.get(s, 0), d + 1)
      for s, (n,) in info["scanned"].items():
        if s in depths:
          raise ValueError(f"CoSwin stage {s} of {label} has both scanned "
                           "and unscanned blocks")
        depths[s] = 2 * n
      if sorted(depths) != list(range(len(depths))):
        raise ValueError(f"CoSwin stages of {label} are not numbered 0.."
                         f"{len(depths) - 1}: {sorted(depths)}")
      offsets = tuple(int(x) for x in np.cumsum([0] + [depths[s] for s in
                                                       sorted(depths)]))
      towers.append(Tower(prefix, "coswin", offsets[-1], offsets[:-1]))
    else:
      if info["blocks"] and info["scanned"]:
        raise ValueError(f"{label} has both scanned and unscanned blocks")
      depth = (max(info["blocks"]) + 1 if info["blocks"]
               else next(iter(info["scanned"][None])))
      towers.append(Tower(prefix, info["kind"], depth))
  return sorted(towers, key=lambda t: t.prefix)


def _layer_id(parts, shape, tower: Tower, multiway: frozenset):
  """Layer number of one param of `tower`: an int, or an int array over the
  leading axis of a scanned param."""
  found = _locate(parts, multiway)
  if found is not None and found[0] == tower.prefix:
    _, kind, where = found
    if kind == "coswin":
      stage, *rest = where
      first = tower.stage_offsets[stage]
      if rest[0] == "pairs":  # pair p = the stage's blocks 2p, 2p + 1
        return first + 2 * np.arange(shape[0]) + rest[1] + 1
      return first + rest[0] + 1
    if where == "scanned":
      return np.arange(shape[0]) + 1
    return where + 1
  top = parts[len(tower.prefix)] if len(parts) > len(tower.prefix) else ""
  if top in EMBEDDING_NAMES or (tower.kind == "multiway"
                                and top in MULTIWAY_EMBEDDING_NAMES):
    return 0
  if tower.kind == "coswin" and (m := _COSWIN_MERGE.fullmatch(top)):
    return tower.stage_offsets[int(m.group(1))]  # = the previous stage's last
  return tower.depth + 1


def layer_ids(params) -> tuple[list[tuple[str, Any, Tower | None]],
                               list[Tower]]:
  """[(flat name, layer id, its tower)] in leaf order, and the towers.
  Params outside every tower have id None (the full lr)."""
  flat = _flat(params)
  multiway = _multiway_prefixes(flat)
  towers = _find_towers(flat, multiway)
  out = []
  for parts, shape in flat:
    # The innermost tower holding the name (towers do not nest in florax's
    # models; the longest prefix is the safe reading if one ever did).
    owners = [t for t in towers if parts[:len(t.prefix)] == t.prefix]
    tower = max(owners, key=lambda t: len(t.prefix)) if owners else None
    lid = None if tower is None else _layer_id(parts, shape, tower,
                                               multiway)
    out.append(("/".join(parts), lid, tower))
  return out, towers


def check_value(decay) -> float:
  """`optimizer.layer_decay` as a float in (0, 1].

  Raises:
    ValueError: anything else, naming the field.
  """
  ok = (isinstance(decay, (int, float, np.floating, np.integer))
        and not isinstance(decay, bool) and 0.0 < float(decay) <= 1.0)
  if not ok:
    raise ValueError(
        "config.optimizer.layer_decay must be a number in (0, 1] (1.0 = "
        f"off; BEiT/EVA fine-tune with 0.65-0.9), got {decay!r}")
  return float(decay)


def multipliers(params, decay: float) -> list[Any]:
  """Per-leaf lr multipliers of a param tree, in its leaf order: None for
  1.0, a float, or for a scanned param a float32 array shaped (layers, 1,
  ..., 1) that broadcasts along its leading axis.

  Raises:
    ValueError: decay < 1 and the model has no encoder layers to decay.
  """
  decay = check_value(decay)
  ids, towers = layer_ids(params)
  if decay < 1.0 and not towers:
    names = sorted({name.split("/")[0] for name, _, _ in ids})
    raise ValueError(
        f"config.optimizer.layer_decay={decay} decays the lr per encoder "
        "layer, but this model has no recognizable encoder layers (expected "
        f"param names like {LAYOUTS}; its top-level params are {names}); "
        "set config.optimizer.layer_decay=1.0")
  shapes = [shape for _, shape in _flat(params)]
  out = []
  for (_, lid, tower), shape in zip(ids, shapes):
    if tower is None or decay == 1.0:
      out.append(None)
      continue
    scale = decay ** (tower.depth + 1 - np.asarray(lid, np.float64))
    if np.ndim(scale) == 0:
      out.append(None if scale == 1.0 else float(scale))
    else:
      out.append(scale.astype(np.float32).reshape(
          (-1,) + (1,) * (len(shape) - 1)))
  return out


def _is_factor(x) -> bool:
  return (isinstance(x, (int, float, np.floating, np.integer))
          and not isinstance(x, bool) and math.isfinite(float(x))
          and float(x) > 0.0)


def check_lr_multipliers(value) -> tuple[tuple[str, float], ...]:
  """`optimizer.lr_multipliers` as ((pattern, factor), ...): a sequence of
  (regular expression, positive finite number) pairs. Format only, so that
  it can be checked before the params exist.

  Raises:
    ValueError: anything else, naming the field and the entry at fault.
  """
  usage = (f"{LR_MULTIPLIERS} must be a sequence of (pattern, factor) "
           "pairs, e.g. (('^head/', 20.0),)")
  # A mapping is refused rather than read: the first matching pattern wins,
  # so the order is part of the meaning, and a config's JSON round trip
  # does not promise to keep a mapping's.
  if not isinstance(value, (tuple, list)):
    raise ValueError(f"{usage}; got {value!r}")
  if (len(value) == 2 and isinstance(value[0], str)
      and not isinstance(value[1], (tuple, list))):
    # The likeliest slip: one pair, not wrapped in a sequence of pairs.
    raise ValueError(f"{usage}; got the bare pair {tuple(value)!r}: write "
                     f"({tuple(value)!r},)")
  out = []
  for i, entry in enumerate(value):
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
      raise ValueError(f"{usage}; entry {i} is {entry!r}")
    pattern, factor = entry
    if not isinstance(pattern, str):
      raise ValueError(f"{LR_MULTIPLIERS}: entry {i}'s pattern must be a "
                       f"string (a regular expression), got {pattern!r}")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{LR_MULTIPLIERS}: {pattern!r} is not a regular "
                       f"expression ({e})") from None
    if not _is_factor(factor):
      raise ValueError(f"{LR_MULTIPLIERS}: the factor of {pattern!r} must be "
                       f"a positive finite number, got {factor!r}")
    out.append((pattern, float(factor)))
  return tuple(out)


def _name_sample(names: list[str], k: int = 5) -> list[str]:
  """A few names from different top-level modules (a head, a backbone...):
  what a user needs to see to fix a pattern."""
  firsts = {}
  for n in names:
    firsts.setdefault(n.split("/")[0], n)
  picked = list(firsts.values())[:k]
  return picked + [n for n in names if n not in picked][:k - len(picked)]


def pattern_factors(params, lr_multipliers) -> list[float]:
  """Per-leaf factor of `optimizer.lr_multipliers`, in the tree's leaf
  order: the factor of the first pattern `re.search`-ing the flat name
  ('/'-joined, as `optimizer.freeze` reads it), 1.0 if none does.

  Raises:
    ValueError: a malformed value (`check_lr_multipliers`), a pattern that
      matches no param, or one that only matches params an earlier pattern
      already claims (either way the pattern would silently do nothing).
  """
  pairs = check_lr_multipliers(lr_multipliers)
  names = ["/".join(parts) for parts, _ in _flat(params)]
  owner: list[int | None] = [None] * len(names)  # index of the first match
  for j, (pattern, _) in enumerate(pairs):
    c = re.compile(pattern)
    hits = [i for i, n in enumerate(names) if c.search(n)]
    if not hits:
      raise ValueError(
          f"{LR_MULTIPLIERS}: {pattern!r} matches no parameter (flat names "
          f"look like {_name_sample(names)})")
    fresh = [i for i in hits if owner[i] is None]
    if not fresh:
      earlier = sorted({pairs[owner[i]][0] for i in hits})
      raise ValueError(
          f"{LR_MULTIPLIERS}: {pattern!r} only matches parameters that the "
          f"earlier pattern(s) {earlier} already set (the first matching "
          f"pattern wins), e.g. {names[hits[0]]!r}; reorder or remove it")
    for i in fresh:
      owner[i] = j
  return [1.0 if j is None else pairs[j][1] for j in owner]


def lr_scales(params, decay: float, lr_multipliers=()) -> list[Any]:
  """Per-leaf scales of the updates, in the tree's leaf order (the form of
  `multipliers`: None for 1.0): the layer-decay multiplier times the
  `lr_multipliers` factor (unilm's BEiT-3 VQA: head x20 on top of the
  layer decay). All None: nothing to scale.

  Raises:
    ValueError: as `multipliers` (decay < 1 only) and `pattern_factors`.
  """
  factors = pattern_factors(params, lr_multipliers)
  # At decay 1 the tree is not searched for towers at all, as before the
  # lr multipliers existed: a model with no recognizable layers is fine.
  layer = (multipliers(params, decay) if check_value(decay) < 1.0
           else [None] * len(factors))
  out = []
  for s, f in zip(layer, factors):
    if f == 1.0:
      out.append(s)
    elif s is None:
      out.append(f)
    elif np.ndim(s) == 0:
      out.append(None if s * f == 1.0 else s * f)
    else:
      out.append((np.asarray(s, np.float64) * f).astype(np.float32))
  return out


def scale_updates(inner: optax.GradientTransformation,
                  scales: list[Any]) -> optax.GradientTransformationExtraArgs:
  """`inner` whose every update is multiplied by its leaf's scale (from
  `lr_scales` or `multipliers`). Its state is `inner`'s, unchanged: the
  scales are constants closed over here, not state."""
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = inner.update(updates, state, params, **extra_args)
    leaves, treedef = jax.tree.flatten(updates)
    if len(leaves) != len(scales):
      raise ValueError(f"lr scales: {len(scales)} multipliers for "
                       f"{len(leaves)} updates (params changed since the "
                       "optimizer was built)")
    leaves = [u if s is None else u * jnp.asarray(s, u.dtype)
              for u, s in zip(leaves, scales)]
    return treedef.unflatten(leaves), state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
