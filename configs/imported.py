"""The config of a model imported by `python -m launch.import_weights`.

The import directory holds it as config.json (like an export's), so the same
directory serves as

  - inference:  florax.inference.load(DIR)
  - a starting point:  --config.init_from.path=DIR  (any run whose model has
    the same names and shapes, e.g. a UniCL fine-tune of an imported CLIP);
  - a config:   --config=configs/workdir.py:DIR, i.e. the imported CLIP as a
    UniCL run (task, model, tokenizer, eval transform and init_from are set;
    name your data: --config.data.records.path=..., and for zero-shot
    evaluation --config.evals.zeroshot.enabled=True
    --config.evals.zeroshot.data.path=RECORDS).

An image-only model (a timm classifier) has no task of its own yet: its
config is a description of the model, and its weights are for init_from and
inference's encode_image.
"""

from __future__ import annotations

import ml_collections

from configs import common
from florax.data import record_pipeline


def _evaluator(kind: str, **fields) -> ml_collections.ConfigDict:
  """A config.evals entry on the user's records; off until a path is set."""
  ev = ml_collections.ConfigDict(dict(type=kind, every=0, enabled=False,
                                      **fields))
  ev.data = ml_collections.ConfigDict(dict(
      source="records", path="", split="validation", names_file="",
      tfds_name="", max_examples=0))
  return ev


def config(model: dict, image_size: int, max_len: int | None,
           preprocess: dict, *, directory: str = "",
           tokenizer_file: str = "") -> ml_collections.ConfigDict:
  """A florax config for an imported model.

  Args:
    model: `config.model` (florax.models.two_tower.from_config).
    image_size: the resolution the model was built for.
    max_len: the text length (None: an image-only model).
    preprocess: the eval transform (florax.data.preprocess spec); its crop
      and mean/std also set the records pipeline's.
    directory: the import directory (absolute): init_from.path, so a run
      started from this config begins with the imported weights.
    tokenizer_file: the tokenizer's file name inside `directory`.
  """
  c = common.base_config()
  has_text = model.get("text") is not None
  # UniCL trains and evaluates two-tower models (CLIP is its special case).
  c.task = "unicl" if has_text else ""
  c.preset = "imported"
  c.model = ml_collections.ConfigDict(model)

  c.data = ml_collections.ConfigDict()
  c.data.name = "records"  # the user's data: --config.data.records.path
  c.data.image_size = int(image_size)
  c.data.max_len = int(max_len or 0)
  c.data.tokenizer_vocab_size = int(
      model["text"]["vocab_size"]) if has_text else 0
  c.data.random_shift = 0
  c.data.train_examples = -1
  c.data.records = record_pipeline.user_data_config()
  if directory and tokenizer_file:
    c.data.records.tokenizer_path = f"{directory.rstrip('/')}/{tokenizer_file}"
  if preprocess.get("transform") in ("center_crop", "resize_center_crop"):
    # The records pipeline's eval transform then crops the same centred
    # square and normalises as the imported model expects.
    c.data.records.crop_fraction = float(preprocess.get(
        "crop_fraction", preprocess["size"] / preprocess.get(
            "resize_size", preprocess["size"])))
    c.data.records.mean = tuple(preprocess["mean"])
    c.data.records.std = tuple(preprocess["std"])

  # Fine-tuning an imported CLIP: a small learning rate, short warmup.
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 0.1

  c.contrastive = ml_collections.ConfigDict()
  c.contrastive.global_loss = True
  c.contrastive.global_backprop = True
  c.contrastive.chunk_size = ml_collections.FieldReference(0, field_type=object)
  c.contrastive.memory_budget_gb = 16.0

  if has_text:
    c.evals.zeroshot = _evaluator("zeroshot", templates="imagenet",
                                  ks=(1, 5))
    c.evals.retrieval = _evaluator("retrieval", ks=(1, 5, 10))
  c.init_from.path = directory
  c.lock()
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`--config=configs/imported.py:DIR` reads DIR/config.json (the same as
  configs/workdir.py: an import directory is read like a workdir)."""
  if not arg:
    raise ValueError("configs/imported.py needs the import directory: "
                     "--config=configs/imported.py:DIR")
  from florax import config_io  # pylint: disable=g-import-not-at-top
  return config_io.load(arg)
