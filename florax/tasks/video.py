"""Video tasks on Video CoSwin (Florence §2.6, §3.8, §3.9).

Two tasks over the moving-digits clips (florax/data/moving_digits.py):

* `video_classify`: the Video CoSwin tower's pooled feature -> the linear
  head of florax/tasks/classify.py (`classify.Classifier`: params
  `image_encoder/...`, `head/...`) over the motion directions; trained
  with label-smoothed cross-entropy (`classify.mixup_target` with lambda 1
  + `classify.soft_cross_entropy`, the paper's Kinetics recipe has no
  Mixup); eval: top-1 and cross-entropy over the held-out clips
  (`classify.classification_metrics`): eval/top1, eval/loss.
* `video_retrieval`: `two_tower.TwoTower` with the Video CoSwin tower in
  the image slot and Florence's text tower (params `image_encoder/...`,
  `text_encoder/...`, `image_proj`, `text_proj`, `logit_scale`, exactly a
  UniCL run's names), trained with the UniCL loss (`UniCLTask.
  contrastive_loss`) on (clip, caption) pairs, the label of a pair being
  its (digit, direction), so every caption of the same pair is a positive.
  Eval (`text_video_recall`): text->video R@1/5/10 (eval/t2v_r{k}): every
  held-out clip's caption queries all held-out clips; the held-out
  captions repeat (10 digits x 4 directions over ~360 clips), so a hit is
  any retrieved clip with the SAME caption text (clips sharing a caption
  are indistinguishable by it); computed once per distinct caption and
  averaged over the clips. video->text (eval/v2t_r{k}): each clip against
  the distinct captions, a hit when its own caption is in the top k.
  Pessimistic ties, as florax.evaluate.retrieval (which computes both).

Model config: `model.image` is the 2-D CoSwin's (the UniCL run's, the
fields of CoSwinConfig), `model.video` the VideoCoSwinConfig fields on top
(temporal kernels/strides, temporal padding, per-stage (t, h, w)
`window_sizes` and `table_windows`; an empty list means None, the model's
default); `video_config` joins them with `video_coswin.from_coswin`.

Seeding from a 2-D checkpoint: `init_from.path=UNICL_WORKDIR` (or an
export). `adapt_init_source` inflates the source's 2-D CoSwin tower
(`image_encoder/*`, recognised by a 4-D `image_encoder/stem/conv/kernel`)
into the video tower's shapes with `video_coswin.inflate` (2-D conv kernels
duplicated over time / kt, 2-D relative position bias duplicated over the
temporal offsets, the rest inherited); a source whose tower is already 3-D
(a video run) loads as is. Everything else then loads by name: the
retrieval task takes the text tower, projections and temperature as well;
the classification head starts fresh.

Tokenizer (retrieval): `beit3_common`'s rule: data.text_tokenizer_path,
else the init_from workdir's tokenizer.model (the UniCL run's: its ids are
what the text tower learned), else one trained into this workdir on the
digits descriptions (the UniCL quickstart's corpus and size). It is
recorded in the workdir; a resume with another tokenizer is refused.

Data (`data.name`): `moving_digits` (generated, the demos) or `records`:
clip records (florax/data/records.py `frames`, written from folders of
frames by launch/make_dataset.py) read by florax/data/video_records.py
with `data.records` (record_pipeline's fields: path, split, crop_scale,
flip, mean/std, ...) and the same temporal fields as the digits (frames,
train_strides, eval_stride); the held-out clips are the records' split
`data.eval_split` (default "validation", the converter's
--holdout_fraction). Classification reads each record's `label` (class
folders: the folder's index in metadata class_names); retrieval its texts
and their UniCL labels.

Multi-view testing: `data.eval_views` = V > 1 evaluates V temporal views
of each held-out clip (evenly spaced starts, florax/data/temporal.py):
classification averages the views' softmax probabilities (Video Swin's
rule), retrieval the views' unit embeddings (renormalised).

Exports (launch/export.py) serve `classify` (video -> labels) or
`encode_video` / `encode_text` (unit embeddings; `ServedModel.similarity`)
with the video an 'array' input: (frames, S, S, 3) float32 pixels already
sampled and normalised as in evaluation.

Not implemented: the gradient cache (contrastive.chunk_size), TFDS video
data, spatial multi-crop testing (views are temporal only).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from florax import export
from florax import serving
from florax.data import moving_digits
from florax.data import record_pipeline
from florax.data import records as records_lib
from florax.data import video_records
from florax.evaluate import mesh_map
from florax.evaluate import retrieval
from florax.models import coswin, text, two_tower
from florax.models import video_coswin
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import beit3_common
from florax.tasks import classify
from florax.tasks import unicl
from florax.tasks.registry import register

TOWER = classify.TOWER  # "image_encoder": the 2-D source's and ours
DATA_SOURCES = ("moving_digits", "records")
_WINDOW_FIELDS = ("window_sizes", "table_windows")


def video_config(model_cfg) -> video_coswin.VideoCoSwinConfig:
  """`model.image` (CoSwin) + `model.video` (the video fields)."""
  base_cfg = two_tower.image_config(model_cfg)
  if type(base_cfg) is not coswin.CoSwinConfig:  # pylint: disable=unidiomatic-typecheck
    raise ValueError(f"model.image.arch={two_tower.image_arch(model_cfg)!r}: "
                     "the video tasks inflate a CoSwin tower; use 'coswin'")
  known = ({f.name for f in dataclasses.fields(video_coswin.VideoCoSwinConfig)}
           - {f.name for f in dataclasses.fields(coswin.CoSwinConfig)})
  fields = {}
  for key, value in (model_cfg.get("video") or {}).items():
    if key not in known:
      raise ValueError(f"model.video.{key} is not a video field of "
                       f"VideoCoSwinConfig (one of {sorted(known)})")
    if key in _WINDOW_FIELDS:
      value = tuple(tuple(int(v) for v in w) for w in value) or None
    fields[key] = value
  return video_coswin.from_coswin(base_cfg, **fields)


def text_video_recall(video_emb, caption_emb, clip_caption,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Text<->video recall@k with captions shared by several clips.

  Args:
    video_emb: (N, d) clip embeddings.
    caption_emb: (U, d) embeddings of the distinct captions.
    clip_caption: (N,) int, the distinct caption of each clip (every
      caption has at least one clip).
  Returns:
    eval/t2v_r{k}: over the N clips, the caption of each queries all clips,
      a hit when any of the top k has that caption (ranks of the distinct
      captions, weighted by how many clips share them);
    eval/v2t_r{k}: over the N clips, the clip queries the U distinct
      captions, a hit when its caption is in the top k.
  Pessimistic ties: wrong candidates scoring >= the best right one count.
  """
  clip_caption = np.asarray(clip_caption)
  # retrieval.ranks' "images" are our captions and its "captions" our
  # clips: its image->text rank is text->video with any clip of the
  # caption a hit, its text->image rank is video->text.
  caption_ranks, clip_ranks = retrieval.ranks(caption_emb, video_emb,
                                              clip_caption)
  t2v = caption_ranks[clip_caption]
  out = {}
  for k in ks:
    out[f"eval/t2v_r{k}"] = float(np.mean(t2v < k))
    out[f"eval/v2t_r{k}"] = float(np.mean(clip_ranks < k))
  return out


class _VideoTask(base.Task):
  """What both video tasks share: clips, the video tower, the held-out set,
  2-D -> 3-D seeding."""
  example_unit = "clips"

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._maps: dict[str, mesh_map.MeshMap] = {}
    self._holdout = None

  # -- config ---------------------------------------------------------------

  @property
  def spec(self) -> moving_digits.ClipSpec:
    return moving_digits.ClipSpec.from_config(self.config.data)

  @property
  def video_config(self) -> video_coswin.VideoCoSwinConfig:
    return video_config(self.config.model)

  @property
  def dtype(self):
    return two_tower.DTYPES[self.config.model.dtype]

  @property
  def from_records(self) -> bool:
    return self.config.data.name == "records"

  @property
  def eval_views(self) -> int:
    return self.config.data.get("eval_views", 1)

  def records_config(self):
    """`data.records` with the fields this task owns filled in."""
    cfg = self.config.data
    rc = record_pipeline.default_data_config()
    rc.update(cfg.records.to_dict())
    rc.source = "records"
    rc.image_size = cfg.image_size
    rc.max_text_len = cfg.get("max_len", 0)
    rc.batch_size = self.config.train.batch_size
    rc.seed = self.config.seed
    return rc

  def clip_transform(self, train: bool, tokenizer=None):
    d = self.config.data
    return video_records.clip_transform(
        self.records_config(), frames=d.frames,
        train_strides=d.train_strides, eval_stride=d.eval_stride,
        train=train, views=self.eval_views, tokenizer=tokenizer,
        max_len=d.get("max_len", 0))

  def _validate_records(self):
    d = self.config.data
    if d.get("records") is None or not d.records.get("path"):
      raise ValueError("data.name='records' needs data.records.path (a clip "
                       "records dir from launch/make_dataset.py)")
    unknown = set(d.records) - set(record_pipeline.user_data_config())
    if unknown:
      raise ValueError(f"data.records.{sorted(unknown)[0]} is not a records "
                       "field (florax/data/record_pipeline.py)")
    records_lib.require_splits(
        d.records.path, (d.records.get("split", "train"),
                         d.get("eval_split", "validation")),
        "convert with --holdout_fraction or set data.eval_split")
    for name in ("image_size", "frames", "eval_stride"):
      if not beit3_common.is_int(d.get(name)) or d.get(name) < 1:
        raise ValueError(f"data.{name} must be a positive integer, got "
                         f"{d.get(name)!r}")
    strides = d.get("train_strides") or ()
    if not strides or any(not beit3_common.is_int(s) or s < 1
                          for s in strides):
      raise ValueError(f"data.train_strides must be positive integers, got "
                       f"{strides!r}")

  def _validate_video(self):
    cfg = self.config
    if cfg.data.name not in DATA_SOURCES:
      raise ValueError(f"data.name={cfg.data.name!r}: the video tasks read "
                       f"{DATA_SOURCES} (florax/data/moving_digits.py, "
                       "florax/data/video_records.py)")
    views = self.eval_views
    if not beit3_common.is_int(views) or views < 1:
      raise ValueError(f"data.eval_views must be a positive integer, got "
                       f"{views!r}")
    if self.from_records:
      self._validate_records()
      video_coswin.validate(self.video_config, cfg.data.frames,
                            cfg.data.image_size)
      return
    spec = self.spec
    spec.validate()
    if cfg.data.get("train_examples", -1) == 0:
      raise ValueError("the digits train split is empty: "
                       "data.train_examples=0")
    per_digit = cfg.data.get("eval_clips_per_digit", 1)
    if not beit3_common.is_int(per_digit) or per_digit < 1:
      raise ValueError(f"data.eval_clips_per_digit must be a positive "
                       f"integer, got {per_digit!r}")
    if cfg.model.get("dtype", "float32") not in two_tower.DTYPES:
      raise ValueError(f"model.dtype={cfg.model.get('dtype')!r} is not one "
                       f"of {sorted(two_tower.DTYPES)}")
    video_coswin.validate(self.video_config, spec.frames, spec.image_size)

  # -- pieces ---------------------------------------------------------------

  def tower(self) -> video_coswin.VideoCoSwin:
    return video_coswin.VideoCoSwin(self.video_config, dtype=self.dtype)

  def _video_spec(self, batch: int) -> jax.ShapeDtypeStruct:
    d = self.config.data
    return jax.ShapeDtypeStruct((batch, d.frames, d.image_size, d.image_size,
                                 3), jnp.float32)

  def adapt_init_source(self, source):
    """Inflates a 2-D CoSwin tower under `image_encoder/` into this task's
    video tower (video_coswin.inflate); other params pass unchanged, and a
    source without a 2-D CoSwin tower (e.g. a video run) is left alone."""
    prefix = TOWER + "/"
    tower = {k[len(prefix):]: v for k, v in source.items()
             if k.startswith(prefix)}
    stem = tower.get("stem/conv/kernel")
    if stem is None or np.ndim(stem) != 4:
      return source
    video_cfg = self.video_config
    coswin_cfg = coswin.CoSwinConfig(**{
        f.name: getattr(video_cfg, f.name)
        for f in dataclasses.fields(coswin.CoSwinConfig)})
    inflated = video_coswin.inflate(export.unflatten_params(tower),
                                    coswin_cfg, video_cfg)
    out = {k: v for k, v in source.items() if not k.startswith(prefix)}
    out.update({prefix + k: np.asarray(v, np.float32)
                for k, v in export.flatten_params(inflated).items()})
    return out

  def _iterator(self, process_index, process_count, keys, tokenizer=None):
    cfg = self.config
    if self.from_records:
      transform = dataclasses.replace(self.clip_transform(True, tokenizer),
                                      keys=tuple(keys))
      return video_records.train_iterator(
          self.records_config(), transform, process_index=process_index,
          process_count=process_count)
    return iter(moving_digits.moving_digits_dataset(
        self.spec, batch_size=cfg.train.batch_size // process_count,
        seed=cfg.seed, process_index=process_index,
        process_count=process_count, tokenizer=tokenizer,
        max_len=cfg.data.get("max_len", 0),
        train_examples=cfg.data.get("train_examples", -1), keys=keys))

  def holdout(self, tokenizer=None) -> dict:
    """The held-out clips, 'video' (N, views, frames, S, S, 3)."""
    if self._holdout is None:
      d = self.config.data
      if self.from_records:
        self._holdout, skipped = video_records.holdout(
            d.records.path, d.get("eval_split", "validation"),
            self.clip_transform(False, tokenizer))
        self._holdout["skipped"] = skipped
      else:
        self._holdout = moving_digits.holdout_clips(
            self.spec, d.get("eval_clips_per_digit", 1), tokenizer=tokenizer,
            max_len=d.get("max_len", 0), views=self.eval_views)
        if self.eval_views == 1:
          self._holdout["video"] = self._holdout["video"][:, None]
    return self._holdout

  def _per_view(self, name, fn, params, videos) -> np.ndarray:
    """fn over (N, V, T, ...) clips -> (N, V, ...) outputs."""
    n, v = videos.shape[:2]
    out = np.asarray(self._map(name, fn)(
        params, videos.reshape((n * v,) + videos.shape[2:])))
    return out.reshape((n, v) + out.shape[1:])

  def _map(self, name, fn) -> mesh_map.MeshMap:
    if name not in self._maps:
      self._maps[name] = mesh_map.MeshMap(
          fn, sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 128))
    return self._maps[name]


@register("video_classify")
class VideoClassifyTask(_VideoTask):
  """Video CoSwin + a linear head over the motion directions."""

  def validate(self):
    self._validate_video()
    model = self.config.model
    if model.get("text") is not None:
      raise ValueError("model.text: video_classify trains a video tower and "
                       "a head; remove the text tower (model.text=None)")
    classes = model.get("num_classes", 0)
    names = self.label_names
    if not beit3_common.is_int(classes) or classes < len(names):
      raise ValueError(f"model.num_classes must be an integer >= "
                       f"{len(names)} (the classes {tuple(names)[:8]}...), "
                       f"got {classes!r}")
    classify._number(model.get("head_init_scale", 0.001),  # pylint: disable=protected-access
                     "model.head_init_scale", 0.0)
    classify._number(model.get("head_dropout", 0.0), "model.head_dropout",  # pylint: disable=protected-access
                     0.0, 1.0)
    classify._number(self.label_smoothing, "finetune.label_smoothing",  # pylint: disable=protected-access
                     0.0, 1.0)

  @property
  def label_names(self) -> tuple[str, ...]:
    if not self.from_records:
      return tuple(moving_digits.DIRECTIONS)
    meta = records_lib.read_metadata(self.config.data.records.path)
    names = meta.get("class_names")
    if not names:
      raise ValueError(f"{self.config.data.records.path} has no class_names "
                       "(convert class folders, or captions with a label "
                       "column)")
    return tuple(names)

  @property
  def label_smoothing(self):
    return (self.config.get("finetune") or {}).get("label_smoothing", 0.0)

  @property
  def model(self) -> classify.Classifier:
    m = self.config.model
    return classify.Classifier(
        image_encoder=self.tower(), num_classes=m.num_classes,
        head_init_scale=float(m.get("head_init_scale", 0.001)),
        head_dropout=float(m.get("head_dropout", 0.0)))

  def batch_spec(self, global_batch_size):
    return {"video": self._video_spec(global_batch_size),
            "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)}

  def init(self, rng):
    return self.model.init({"params": rng}, jnp.zeros(
        self._video_spec(1).shape, jnp.float32))["params"]

  def train_iterators(self, process_index, process_count):
    return {base.DEFAULT_KIND: self._iterator(process_index, process_count,
                                              ("video", "label"))}

  def loss(self, params, batch, rng, ctx=None):
    targets = classify.mixup_target(batch["label"],
                                    self.config.model.num_classes, 1.0,
                                    float(self.label_smoothing))
    logits = self.model.apply({"params": params}, batch["video"],
                              deterministic=False, rngs={"dropout": rng})
    loss = classify.soft_cross_entropy(logits, targets)
    hits = jnp.argmax(logits, -1) == batch["label"]
    return loss, {"accuracy": jnp.mean(hits.astype(jnp.float32))}

  def evaluate(self, params, frozen=None, step=None):
    clips = self.holdout()
    model = self.model
    logits = self._per_view("logits",
                            lambda p, v: model.apply({"params": p}, v),
                            params, clips["video"]).astype(np.float64)
    # views: the mean of their probabilities; its log ranks and scores
    # like logits (log-softmax of it is itself).
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    metrics = classify.classification_metrics(
        np.log(probs.mean(1) + 1e-30), clips["label"], ks=(1, 5))
    if "skipped" in clips:
      metrics["eval/skipped"] = float(clips["skipped"])
    return metrics

  def serving(self):
    """`classify`: a sampled clip (frames, S, S, 3) -> the class label."""
    model, shape = self.model, self._video_spec(1).shape[1:]

    def fn(params, video):
      return model.apply({"params": params}, video)
    return {"classify": serving.Function(
        fn, (serving.Input("video", "array", shape),), "labels",
        self.label_names)}


@register("video_retrieval")
class VideoRetrievalTask(_VideoTask):
  """Video CoSwin + Florence's text tower, UniCL on (clip, caption)."""
  # The contrastive loss needs the whole batch as negatives.
  supports_grad_accumulation = False
  contrastive_loss = unicl.UniCLTask.contrastive_loss

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._tokenizer = None

  @property
  def text_tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = beit3_common.load_text_tokenizer(self.config,
                                                         self.workdir)
    return self._tokenizer

  def validate(self):
    self._validate_video()
    cfg = self.config
    if cfg.model.get("text") is None:
      raise ValueError("video_retrieval needs model.text (the text tower)")
    if not beit3_common.is_int(cfg.model.get("embed_dim", 0)) or (
        cfg.model.embed_dim <= 0):
      raise ValueError(f"model.embed_dim must be a positive integer (the "
                       f"joint space), got {cfg.model.get('embed_dim')!r}")
    text_cfg = text.TextConfig(**dict(cfg.model.text))
    text.validate(text_cfg)
    if not beit3_common.is_int(cfg.data.max_len) or not (
        2 < cfg.data.max_len <= text_cfg.max_len):
      raise ValueError(f"data.max_len must be an integer in [3, "
                       f"model.text.max_len={text_cfg.max_len}], got "
                       f"{cfg.data.max_len!r}")
    chunk = (cfg.get("contrastive") or {}).get("chunk_size", 0)
    if chunk:
      raise ValueError(f"contrastive.chunk_size={chunk!r}: video_retrieval "
                       "has no gradient cache; use 0")
    tok = self.text_tokenizer
    where = beit3_common.tokenizer_file(cfg, self.workdir)
    if tok.vocab_size > text_cfg.vocab_size:
      raise ValueError(
          f"the text tokenizer ({where}) has {tok.vocab_size} pieces but "
          f"model.text.vocab_size is {text_cfg.vocab_size}")
    if tok.eos_id != text_cfg.eos_id or text_cfg.pad_id not in (None,
                                                                tok.pad_id):
      raise ValueError(
          f"the text tokenizer ({where}) ends texts with id {tok.eos_id} and "
          f"pads with {tok.pad_id}, but model.text has eos_id="
          f"{text_cfg.eos_id}, pad_id={text_cfg.pad_id}")
    if self.from_records:  # their texts are cut to max_len, as images'
      return
    longest = max(moving_digits.all_captions(),
                  key=lambda t: len(tok.pieces(t)))
    if len(tok.pieces(longest)) + 2 > cfg.data.max_len:
      raise ValueError(
          f"data.max_len={cfg.data.max_len} cuts captions: {longest!r} is "
          f"{len(tok.pieces(longest))} pieces + bos/eos with this tokenizer "
          f"({where})")

  @property
  def model(self) -> two_tower.TwoTower:
    m = self.config.model
    return two_tower.TwoTower(
        image_encoder=self.tower(),
        text_encoder=text.TextTransformer(text.TextConfig(**dict(m.text)),
                                          dtype=self.dtype),
        embed_dim=m.embed_dim,
        init_temperature=m.get("init_temperature", 0.07))

  def batch_spec(self, global_batch_size):
    b = global_batch_size
    return {"video": self._video_spec(b),
            "ids": jax.ShapeDtypeStruct((b, self.config.data.max_len),
                                        jnp.int32),
            "caption_label": jax.ShapeDtypeStruct((b,), jnp.int32)}

  def init(self, rng):
    return self.model.init(
        {"params": rng}, jnp.zeros(self._video_spec(1).shape, jnp.float32),
        jnp.zeros((1, self.config.data.max_len), jnp.int32))["params"]

  def train_iterators(self, process_index, process_count):
    beit3_common.record_tokenizer(self)
    return {base.DEFAULT_KIND: self._iterator(
        process_index, process_count, ("video", "ids", "caption_label"),
        tokenizer=self.text_tokenizer)}

  def loss(self, params, batch, rng, ctx=None):
    video_emb, text_emb, scale = self.model.apply(
        {"params": params}, batch["video"], batch["ids"],
        deterministic=False, rngs={"dropout": rng})
    loss, metrics = self.contrastive_loss(video_emb, text_emb,
                                          batch["caption_label"], scale)
    metrics["temperature"] = 1.0 / scale
    return loss, metrics

  def evaluate(self, params, frozen=None, step=None):
    clips = self.holdout(self.text_tokenizer)
    _, first, clip_caption = np.unique(
        np.asarray(clips["caption"]), return_index=True, return_inverse=True)
    encode_video, encode_text = export.encoders(self.model)
    # views: the mean of their unit embeddings, renormalised
    video_emb = self._per_view("video", encode_video, params,
                               clips["video"]).mean(1)
    video_emb /= np.linalg.norm(video_emb, axis=-1, keepdims=True)
    caption_emb = self._map("text", encode_text)(params,
                                                 clips["ids"][first])
    ks = tuple(self.config.get("eval_ks", (1, 5, 10)))
    metrics = text_video_recall(video_emb, caption_emb,
                                np.asarray(clip_caption).reshape(-1), ks)
    if "skipped" in clips:
      metrics["eval/skipped"] = float(clips["skipped"])
    return metrics

  def serving(self):
    """`encode_video` / `encode_text`: unit embeddings as the evaluator's
    (`ServedModel.similarity` ranks them)."""
    encode_video, encode_text = export.encoders(self.model)
    length = self.config.data.max_len
    return {
        "encode_video": serving.Function(
            encode_video, (serving.Input("video", "array",
                                         self._video_spec(1).shape[1:]),),
            "embedding"),
        "encode_text": serving.Function(
            encode_text, (serving.Input("text", "text", (length,), "int32"),),
            "embedding")}

  def serving_tokenizer(self):
    return self.text_tokenizer
