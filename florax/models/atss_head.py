"""ATSS head outputs (Zhang et al. 2020, "Bridging the Gap Between
Anchor-based and Anchor-free Detection via Adaptive Training Sample
Selection"), as DyHead/Florence put it after the DyHead blocks.

One anchor per location. Shared by all pyramid levels l:

  T_cls = tower_cls(P_l),  T_box = tower_box(P_l)
    (num_convs x [3x3 conv -> GroupNorm(32) -> ReLU] each; ATSS alone uses
     4, after DyHead 0, i.e. T = P_l)
  cls_l    = Conv3x3(T_cls) -> num_classes logits,
             bias = -log((1 - p) / p) with p = prior_prob (focal loss prior)
  deltas_l = s_l * Conv3x3(T_box) -> 4 box deltas, s_l a learnable scalar
             per level (init 1.0)
  ctr_l    = Conv3x3(T_box) -> 1 centerness logit (on the box tower, as ATSS)

Output conv weights N(0, 0.01^2), zero biases except the cls prior.

Layout: levels concatenated finest first; within a level locations are
row-major (y, then x): anchor a of level l at (y, x) is
sum_{m<l} H_m W_m + y W_l + x. Returns (cls (B, A, num_classes),
deltas (B, A, 4), centerness (B, A)); compute in `dtype`, params float32.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from florax.models import pyramid

TOWER_GN_GROUPS = 32


class ATSSHead(nn.Module):
  num_classes: int
  channels: int
  num_convs: int = 0
  prior_prob: float = 0.01
  dtype: Any = jnp.float32

  @staticmethod
  def feature_shapes(features: Sequence) -> tuple[tuple[int, int], ...]:
    """(H_l, W_l) of every level (static ints), finest first."""
    return tuple((int(f.shape[1]), int(f.shape[2])) for f in features)

  @staticmethod
  def num_anchors(shapes: Sequence[tuple[int, int]]) -> int:
    return sum(h * w for h, w in shapes)

  @nn.compact
  def __call__(self, features: Sequence):
    init = nn.initializers.normal(0.01)

    def tower(prefix):
      convs = [pyramid.conv(self.channels, 3, dtype=self.dtype,
                            kernel_init=init, name=f"{prefix}_conv{i}")
               for i in range(self.num_convs)]
      norms = [pyramid.group_norm(self.channels, TOWER_GN_GROUPS,
                                  name=f"{prefix}_norm{i}")
               for i in range(self.num_convs)]

      def apply(x):
        for c, n in zip(convs, norms):
          x = nn.relu(n(c(x))).astype(self.dtype)
        return x
      return apply

    cls_tower, box_tower = tower("cls_tower"), tower("box_tower")
    prior = -math.log((1.0 - self.prior_prob) / self.prior_prob)
    out_axes = (None, None, "conv_in", None)
    cls_conv = pyramid.conv(self.num_classes, 3, dtype=self.dtype,
                            kernel_init=init,
                            bias_init=nn.initializers.constant(prior),
                            axes=out_axes, name="cls_logits")
    box_conv = pyramid.conv(4, 3, dtype=self.dtype, kernel_init=init,
                            axes=out_axes, name="bbox_pred")
    ctr_conv = pyramid.conv(1, 3, dtype=self.dtype, kernel_init=init,
                            axes=out_axes, name="centerness")
    scales = self.param("scales", nn.with_logical_partitioning(
        nn.initializers.ones, (None,)), (len(features),), jnp.float32)
    cls_out, box_out, ctr_out = [], [], []
    for l, f in enumerate(features):
      b = f.shape[0]
      f = f.astype(self.dtype)
      t_cls, t_box = cls_tower(f), box_tower(f)
      cls_out.append(cls_conv(t_cls).reshape(b, -1, self.num_classes))
      box_out.append((box_conv(t_box) * scales[l].astype(self.dtype)
                      ).reshape(b, -1, 4))
      ctr_out.append(ctr_conv(t_box).reshape(b, -1))
    return (jnp.concatenate(cls_out, 1), jnp.concatenate(box_out, 1),
            jnp.concatenate(ctr_out, 1))
