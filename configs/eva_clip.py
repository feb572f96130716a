"""EVA-CLIP: a CLIP whose image tower starts from an EVA MIM checkpoint.

The contrastive task is Florence's (UniCL, which is CLIP when every text
is its own class; global loss, gradient cache); only the image tower
changes: a ViT shaped like the EVA student, seeded with
  --config.init_from.path=EVA_WORKDIR
through init_from.prefixes [["image_encoder", "image_encoder"]] (the
student's [MASK] token and MIM head stay behind). Without init_from.path
the same CLIP trains from random init (the demo's baseline).

Presets (`--config configs/eva_clip.py:NAME`):
  tiny  the EVA tiny student (ViT 2 x 64, patch 8, 32 px) + Florence's tiny
        text tower on the embedded digits: the CPU demo.
  g14   EVA CLIP-g (EVA Table 10a): the EVA-g/14 image tower (1.0B) and
        OpenAI CLIP-L's text tower (12 x 768, 124M; florax preset 'L'),
        224 px, batch 41k, fp16 with dynamic loss scaling, ZeRO stage 1,
        11B samples seen (268k steps). EVA also initialises the text tower
        from OpenAI CLIP-L: import it with launch.import_weights and seed
        the text tower from that export in a second run, or train it here.
"""

from __future__ import annotations

from configs import eva, florence

# name: (florence preset for the text tower and recipe, ViT preset, image
# size, embed dim, global batch, steps)
_PRESETS = {
    "tiny": ("tiny", "tiny/8", 32, 64, 128, 300),
    "g14": ("b", "g/14", 224, 1024, 41_984, 268_000),
}


def get_config(arg: str | None = None):
  name = (arg or "tiny").lower()
  if name not in _PRESETS:
    raise ValueError(f"unknown eva_clip preset {arg!r}; choose one of "
                     f"{sorted(_PRESETS)}")
  base, vit_preset, image_size, embed_dim, batch, steps = _PRESETS[name]
  c = florence.get_config(base)
  tiny = name == "tiny"
  with c.unlocked():
    c.preset = f"eva_clip_{name}"
    c.model.image = eva.image_config(vit_preset, image_size,
                                     remat="none" if tiny else "full")
    if not tiny:
      c.model.text = florence._text_config("L")  # pylint: disable=protected-access
      c.data.max_len = c.model.text.max_len
  c.model.embed_dim = embed_dim
  c.model.dtype = "float32" if tiny else "float16"
  c.data.image_size = image_size
  c.train.batch_size = batch
  c.train.steps = steps
  c.optimizer.warmup_steps = 20 if tiny else 2_000
  c.sharding.zero_stage = 0 if tiny else 1
  c.init_from.prefixes = (("image_encoder", "image_encoder"),)
  return c
