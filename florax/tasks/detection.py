"""Object detection: Florence's object-level adapter (§2.5, §3.4).

The image tower (`model.image`: CoSwin, an imported Swin, or a plain ViT
such as EVA's or an imported timm ViT) feeds a feature pyramid (FPN over
CoSwin's stages; ViTDet's simple pyramid over a ViT's patch grid), a stack of Dynamic Head blocks and an ATSS head
(florax/models/detector.py); training assigns anchors with ATSS and sums
the focal, GIoU and centerness losses (florax/detection/); inference keeps
the best (anchor, class) pairs, decodes and runs class-aware NMS inside
the jitted function (florax/detection/postprocess.py).

Params: `image_encoder/...` (the tower: a UniCL run's image tower loads by
name, `init_from.prefixes=[["image_encoder", "image_encoder"]]`; Swin
weights imported from timm too), `pyramid/...`, `dyhead/...`, `head/...`.

Data (`data.name`):
  * `digits_canvas` (the embedded demo): several sklearn digits at random
    scales and places on a black canvas (florax/data/digits_canvas.py),
    boxes tight around the ink, the ten digits as classes; the held-out
    canvases use only held-out digits.
  * `records`: COCO-format detection converted by
    `python -m launch.make_dataset --coco_instances=... --coco_images=...`
    (florax/data/coco.py): images resized keeping aspect, flipped and
    cropped with their boxes in training, padded to data.image_size.
Every image's ground truth is padded to `data.max_objects` rows (label -1),
so the step has one static shape.

Evaluation: COCO AP, AP50, AP75, APs/m/l (pycocotools, florax/evaluate/
coco_map.py) of the detector's outputs over the held-out split, in the
original image coordinates (eval/AP, eval/AP50, ...), and a PNG of
predicted boxes on the first 8 held-out images (dashed: the ground truth)
in `workdir/plots/boxes_step<N>.png` (`boxes_final.png` at the end; off
with plot_boxes=False).

Export: `detect` serves (B, max_detections, 6) rows [x1, y1, x2, y2,
score, class] in the model's input pixels (a padded row has score 0 and
class -1), images preprocessed as in evaluation (resized, padded).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from florax import serving
from florax.data import coco
from florax.data import digits
from florax.data import digits_canvas
from florax.data import records as records_lib
from florax.detection import anchors as anchors_lib
from florax.detection import losses as det_losses
from florax.detection import postprocess
from florax.evaluate import box_plot
from florax.evaluate import coco_map
from florax.evaluate import mesh_map
from florax.models import coswin
from florax.models import detector as detector_lib
from florax.models import two_tower
from florax.models import vit
from florax.parallel import sharding as sharding_lib
from florax.tasks import base
from florax.tasks import beit3_common
from florax.tasks.registry import register

TOWER = "image_encoder"
DATA_SOURCES = ("digits_canvas", "records")
# one row of a packed detection: x1, y1, x2, y2, score, class
_ROW = 6


def canvas_spec(data_cfg) -> digits_canvas.CanvasSpec:
  return digits_canvas.CanvasSpec(
      size=data_cfg.image_size, min_digits=data_cfg.canvas.min_digits,
      max_digits=data_cfg.canvas.max_digits,
      min_scale=data_cfg.canvas.min_scale,
      max_scale=data_cfg.canvas.max_scale,
      max_overlap=data_cfg.canvas.max_overlap)


@register("detection")
class DetectionTask(base.Task):
  """Dynamic Head + ATSS on an image tower (module docstring)."""
  example_unit = "images"

  def __init__(self, config, workdir, mesh, rules):
    super().__init__(config, workdir, mesh, rules)
    self._holdout = None
    self._maps: dict[str, mesh_map.MeshMap] = {}
    self._anchors = None

  # -- config ---------------------------------------------------------------

  @property
  def image_config(self):
    return two_tower.image_config(self.config.model)

  @property
  def detector_config(self) -> detector_lib.DetectorConfig:
    fields = dict(self.config.model.detector)
    if "pyramid_scales" in fields:
      fields["pyramid_scales"] = tuple(fields["pyramid_scales"])
    # The pyramid follows the tower: CoSwin's stages -> FPN, a plain ViT's
    # patch grid -> ViTDet's simple pyramid.
    return detector_lib.DetectorConfig(
        num_classes=len(self.class_names),
        backbone=("vit" if isinstance(self.image_config, vit.ViTConfig)
                  else "coswin"), **fields)

  @property
  def dtype(self):
    return two_tower.DTYPES[self.config.model.get("dtype", "float32")]

  @functools.cached_property
  def class_names(self) -> tuple[str, ...]:
    if self.config.data.name == "records":
      return tuple(c["name"] for c in coco.categories(
          self.config.data.records.path))
    return tuple(digits.CLASS_WORDS)

  @functools.cached_property
  def category_ids(self) -> list[int]:
    if self.config.data.name == "records":
      return [int(c["id"]) for c in coco.categories(
          self.config.data.records.path)]
    return list(range(1, 11))

  def validate(self):
    cfg = self.config
    d = cfg.data
    if d.name not in DATA_SOURCES:
      raise ValueError(f"data.name={d.name!r}: detection reads "
                       f"{DATA_SOURCES}")
    for name in ("image_size", "max_objects", "eval_images"):
      if not beit3_common.is_int(d.get(name)) or d.get(name) < 1:
        raise ValueError(f"data.{name} must be a positive integer, got "
                         f"{d.get(name)!r}")
    if d.name == "digits_canvas":
      canvas_spec(d).validate()
      if d.max_objects < d.canvas.max_digits:
        raise ValueError(f"data.max_objects={d.max_objects} < data.canvas."
                         f"max_digits={d.canvas.max_digits}: boxes would be "
                         "dropped")
    elif not d.records.get("path"):
      raise ValueError("data.name='records' needs data.records.path (COCO "
                       "converted by launch/make_dataset.py --coco_instances)")
    else:
      records_lib.require_splits(
          d.records.path, (d.records.get("split", "train"),
                           d.get("eval_split", "validation")),
          "convert it with launch/make_dataset.py --coco_instances ... "
          "--split=NAME")
      self.class_names  # pylint: disable=pointless-statement (reads metadata)
    image_cfg = self.image_config
    if isinstance(image_cfg, coswin.CoSwinConfig):
      coswin.validate(image_cfg, d.image_size)
    elif isinstance(image_cfg, vit.ViTConfig):
      if image_cfg.image_size != d.image_size:
        raise ValueError(f"model.image.image_size={image_cfg.image_size} != "
                         f"data.image_size={d.image_size}: a ViT backbone "
                         "is built for one input size")
    else:
      raise ValueError(f"model.image.arch={two_tower.image_arch(cfg.model)!r}"
                       ": the detector's pyramid reads CoSwin/Swin stages or "
                       "a plain ViT's patch grid ('coswin' or 'vit')")
    known = set(detector_lib.DetectorConfig.__dataclass_fields__) - {
        "num_classes", "backbone"}
    unknown = set(cfg.model.detector) - known
    if unknown:
      raise ValueError(f"model.detector.{sorted(unknown)[0]} is not a "
                       f"DetectorConfig field ({sorted(known)})")
    try:
      detector_lib.validate(self.detector_config)
    except TypeError as e:
      raise ValueError(f"model.detector: {e}") from None
    det = cfg.detector
    if not isinstance(det.get("anchor_scale"), (int, float)) or (
        det.anchor_scale <= 0):
      raise ValueError(f"detector.anchor_scale must be > 0, got "
                       f"{det.get('anchor_scale')!r}")
    for name, lo, hi in (("score_threshold", 0.0, 1.0),
                         ("iou_threshold", 0.0, 1.0),
                         ("focal_alpha", 0.0, 1.0), ("focal_gamma", 0.0, 10.0),
                         ("box_weight", 0.0, 1e3)):
      v = det.get(name)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not (
          lo <= v <= hi):
        raise ValueError(f"detector.{name} must be a number in [{lo}, {hi}],"
                         f" got {v!r}")
    for name in ("topk", "pre_nms_topk", "max_detections"):
      if not beit3_common.is_int(det.get(name)) or det.get(name) < 1:
        raise ValueError(f"detector.{name} must be a positive integer, got "
                         f"{det.get(name)!r}")
    if cfg.model.get("dtype", "float32") not in two_tower.DTYPES:
      raise ValueError(f"model.dtype={cfg.model.get('dtype')!r} is not one "
                       f"of {sorted(two_tower.DTYPES)}")

  # -- model ----------------------------------------------------------------

  @property
  def model(self) -> detector_lib.Detector:
    return detector_lib.Detector(
        config=self.detector_config,
        backbone=two_tower.image_encoder(self.config.model, self.dtype),
        dtype=self.dtype)

  def _image_spec(self, batch: int) -> jax.ShapeDtypeStruct:
    s = self.config.data.image_size
    return jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)

  def batch_spec(self, global_batch_size):
    b, g = global_batch_size, self.config.data.max_objects
    return {"images": self._image_spec(b),
            "boxes": jax.ShapeDtypeStruct((b, g, 4), jnp.float32),
            "labels": jax.ShapeDtypeStruct((b, g), jnp.int32)}

  def init(self, rng):
    return self.model.init({"params": rng}, jnp.zeros(
        self._image_spec(1).shape, jnp.float32))["params"]

  @property
  def anchors(self) -> tuple[np.ndarray, tuple[int, ...]]:
    """(anchors (A, 4), level sizes) of the model's pyramid."""
    if self._anchors is None:
      model = self.model
      shapes = detector_lib.feature_shapes(model, self._image_spec(1))
      strides = detector_lib.level_strides(
          detector_lib.backbone_strides(model.config, model.backbone),
          model.config.num_levels)
      self._anchors = (anchors_lib.anchors(
          shapes, strides, self.config.detector.anchor_scale),
                       anchors_lib.level_sizes(shapes))
    return self._anchors

  # -- data -----------------------------------------------------------------

  def train_iterators(self, process_index, process_count):
    cfg = self.config
    d = cfg.data
    local = cfg.train.batch_size // process_count
    if d.name == "digits_canvas":
      ds = digits_canvas.canvas_dataset(
          canvas_spec(d), batch_size=local, seed=cfg.seed,
          max_objects=d.max_objects, process_index=process_index,
          process_count=process_count)
      return {base.DEFAULT_KIND: iter(ds)}
    return {base.DEFAULT_KIND: coco.records_detection_dataset(
        d.records.path, d.records.get("split", "train"), size=d.image_size,
        batch_size=local, seed=cfg.seed, max_objects=d.max_objects,
        process_index=process_index, process_count=process_count,
        train=True)}

  def holdout(self) -> dict:
    if self._holdout is None:
      d = self.config.data
      if d.name == "digits_canvas":
        self._holdout = digits_canvas.holdout_set(
            canvas_spec(d), d.eval_images, seed=0, max_objects=d.max_objects)
      else:
        self._holdout = coco.records_holdout(
            d.records.path, d.get("eval_split", "validation"), d.image_size,
            d.max_objects)
    return self._holdout

  # -- objective ------------------------------------------------------------

  def loss(self, params, batch, rng, ctx=None):
    det = self.config.detector
    cls, deltas, ctr, _ = self.model.apply(
        {"params": params}, batch["images"], deterministic=False,
        rngs={"dropout": rng})
    anchors, sizes = self.anchors
    total, metrics = det_losses.atss_loss(
        cls.astype(jnp.float32), deltas.astype(jnp.float32),
        ctr.astype(jnp.float32), jnp.asarray(anchors), sizes,
        batch["boxes"], batch["labels"], topk=det.topk,
        box_weight=det.box_weight, alpha=det.focal_alpha,
        gamma=det.focal_gamma)
    return total, metrics

  # -- inference ------------------------------------------------------------

  def detect(self, params, images):
    """(B, max_detections, 6) packed detections in input pixels."""
    det = self.config.detector
    cls, deltas, ctr, _ = self.model.apply({"params": params}, images)
    anchors, sizes = self.anchors
    s = self.config.data.image_size
    run = functools.partial(
        postprocess.detect, anchors=jnp.asarray(anchors), level_sizes=sizes,
        image_size=(s, s), score_threshold=det.score_threshold,
        pre_nms_topk=det.pre_nms_topk, iou_threshold=det.iou_threshold,
        max_detections=det.max_detections)
    out = jax.vmap(lambda c, b, z: run(c, b, z))(
        cls.astype(jnp.float32), deltas.astype(jnp.float32),
        ctr.astype(jnp.float32))
    valid = out["valid"]
    return jnp.concatenate([
        jnp.where(valid[..., None], out["boxes"], 0.0),
        jnp.where(valid, out["scores"], 0.0)[..., None],
        jnp.where(valid, out["classes"], -1).astype(jnp.float32)[..., None]],
                           axis=-1)

  def predictions(self, params, images) -> dict[str, np.ndarray]:
    if "detect" not in self._maps:
      self._maps["detect"] = mesh_map.MeshMap(
          self.detect, sharding_lib.batch_sharding(self.mesh, self.rules),
          self.config.get("eval_batch_size", 64))
    rows = np.asarray(self._maps["detect"](params, images))
    classes = rows[..., 5].astype(np.int32)
    return {"boxes": rows[..., :4], "scores": rows[..., 4],
            "classes": classes, "valid": classes >= 0}

  def evaluate(self, params, frozen=None, step=None):
    held = self.holdout()
    pred = self.predictions(params, held["images"])
    dets = coco_map.detections_to_coco(
        pred["boxes"], pred["scores"], pred["classes"], pred["valid"],
        held["image_id"], self.category_ids, held.get("scale"))
    metrics = {f"eval/{k}": float(v)
               for k, v in coco_map.coco_metrics(held["coco"], dets).items()}
    if jax.process_index() == 0 and self.config.get("plot_boxes", True):
      # the trainer's last evaluation passes no step: boxes_final.png
      path = os.path.join(self.workdir, "plots", "boxes_final.png"
                          if step is None else f"boxes_step{int(step)}.png")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      n = 8
      box_plot.save_box_plot(
          path, held["images"][:n],
          {k: v[:n] for k, v in pred.items()},
          gt={"boxes": held["boxes"][:n], "labels": held["labels"][:n]},
          class_names=self.class_names)
    return metrics

  def serving(self):
    s = self.config.data.image_size
    return {"detect": serving.Function(
        self.detect, (serving.Input("images", "image", (s, s, 3)),),
        "logits")}
