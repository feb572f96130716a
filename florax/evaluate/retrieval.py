"""Image<->text retrieval recall@k with several captions per image.

COCO / Flickr30K layout: N_i images, N_t captions, caption j describes image
`text_to_image[j]`; every image has at least one caption.

- image->text (i2t): a hit at k iff ANY of the image's captions is among the
  k highest-scoring captions.
- text->image (t2i): a hit at k iff the caption's image is among the k
  highest-scoring images.

Tie rule (same as `florax.evaluate.zeroshot`): pessimistic. The rank of a
query is the number of WRONG candidates scoring >= its best right candidate;
a hit at k iff rank < k. Equal scores therefore never help a query.

Computed in jax on whatever device holds the embeddings: one jitted function
scores a fixed-size chunk of queries against all candidates, so at most
`chunk_size x N` similarities exist at a time and the chunk compiles once
(the last chunk is padded, its padded rows dropped). jnp rather than numpy so
that a 25k x 25k COCO evaluation runs on the accelerator, not the host; the
matmul uses HIGHEST precision so TF32/bf16 passes cannot create or break ties.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames="chunk")
def _i2t_chunk(image_emb, text_emb, text_to_image, start, *, chunk):
  queries = jax.lax.dynamic_slice_in_dim(image_emb, start, chunk)
  sims = jnp.matmul(queries, text_emb.T, precision=_HIGHEST)  # (chunk, N_t)
  image_ids = start + jnp.arange(chunk)
  positive = text_to_image[None, :] == image_ids[:, None]
  best_positive = jnp.max(jnp.where(positive, sims, -jnp.inf), axis=1)
  return jnp.sum(~positive & (sims >= best_positive[:, None]), axis=1)


@functools.partial(jax.jit, static_argnames="chunk")
def _t2i_chunk(text_emb, image_emb, text_to_image, start, *, chunk):
  queries = jax.lax.dynamic_slice_in_dim(text_emb, start, chunk)
  targets = jax.lax.dynamic_slice_in_dim(text_to_image, start, chunk)
  sims = jnp.matmul(queries, image_emb.T, precision=_HIGHEST)  # (chunk, N_i)
  true = jnp.take_along_axis(sims, targets[:, None], axis=1)
  wrong = jnp.arange(sims.shape[1])[None, :] != targets[:, None]
  return jnp.sum(wrong & (sims >= true), axis=1)


def _pad_rows(x, multiple):
  pad = (-x.shape[0]) % multiple
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x


def _chunked(fn, queries, candidates, text_to_image_padded, n, chunk):
  queries = _pad_rows(queries, chunk)
  out = [fn(queries, candidates, text_to_image_padded, jnp.int32(s),
            chunk=chunk) for s in range(0, queries.shape[0], chunk)]
  return np.concatenate([np.asarray(o) for o in out])[:n]


def ranks(image_emb, text_emb, text_to_image,
          chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Pessimistic ranks of the right answer for every query, both ways.

  Args:
    image_emb: (N_i, d) image embeddings.
    text_emb: (N_t, d) caption embeddings.
    text_to_image: (N_t,) int, the image each caption describes.
    chunk_size: queries scored per step (bounds memory to chunk x N).

  Returns:
    (i2t_ranks (N_i,), t2i_ranks (N_t,)) int numpy arrays; 0 = retrieved first.
  """
  image_emb = jnp.asarray(image_emb)
  text_emb = jnp.asarray(text_emb)
  t2i = np.asarray(text_to_image)
  if image_emb.ndim != 2 or text_emb.ndim != 2:
    raise ValueError(
        f"embeddings must be 2-D; got image {image_emb.shape}, text "
        f"{text_emb.shape}")
  if image_emb.shape[1] != text_emb.shape[1]:
    raise ValueError(
        f"image and text embeddings differ in width: {image_emb.shape[1]} vs "
        f"{text_emb.shape[1]}")
  n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
  if n_img == 0 or n_txt == 0:
    raise ValueError("need at least one image and one caption")
  if t2i.shape != (n_txt,) or not np.issubdtype(t2i.dtype, np.integer):
    raise ValueError(
        f"text_to_image must be an int array of shape ({n_txt},), got "
        f"{t2i.dtype} {t2i.shape}")
  if t2i.min() < 0 or t2i.max() >= n_img:
    raise ValueError(
        f"text_to_image values must lie in [0, {n_img}); got "
        f"[{t2i.min()}, {t2i.max()}]")
  captionless = np.setdiff1d(np.arange(n_img), t2i)
  if captionless.size:
    raise ValueError(
        f"{captionless.size} images have no caption (first: "
        f"{captionless[:5].tolist()}); image->text recall is undefined")
  # NaN compares False everywhere, which would give rank 0: refuse it.
  if not (bool(jnp.all(jnp.isfinite(image_emb))) and
          bool(jnp.all(jnp.isfinite(text_emb)))):
    raise ValueError("embeddings contain NaN or inf")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

  t2i_dev = jnp.asarray(t2i, jnp.int32)
  chunk_i = min(chunk_size, n_img)
  chunk_t = min(chunk_size, n_txt)
  i2t_ranks = _chunked(_i2t_chunk, image_emb, text_emb, t2i_dev, n_img,
                       chunk_i)
  # Padded caption rows point at image 0; their ranks are cut off below.
  t2i_padded = _pad_rows(t2i_dev, chunk_t)
  t2i_ranks = _chunked(_t2i_chunk, text_emb, image_emb, t2i_padded, n_txt,
                       chunk_t)
  return i2t_ranks, t2i_ranks


def recall_at_k(image_emb, text_emb, text_to_image,
                ks: Sequence[int] = (1, 5, 10),
                chunk_size: int = 1024) -> dict[str, float]:
  """Retrieval recall@k in both directions.

  Args:
    image_emb: (N_i, d) image embeddings (normalise them first for cosine).
    text_emb: (N_t, d) caption embeddings.
    text_to_image: (N_t,) int, the image each caption describes.
    ks: the k of each recall reported.
    chunk_size: queries scored per step.

  Returns:
    {"i2t_r{k}": fraction of images, "t2i_r{k}": fraction of captions} in
    [0, 1] for every k.
  """
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise ValueError(f"every k must be >= 1, got {ks}")
  i2t, t2i = ranks(image_emb, text_emb, text_to_image, chunk_size)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(i2t < k))
    out[f"t2i_r{k}"] = float(np.mean(t2i < k))
  return out
