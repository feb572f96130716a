"""Config -> per-process Grain iterator over records, exactly resumable.

  source (records dir | captions folder | TFDS)
    -> this process's disjoint shard   ds[process_index::process_count]
    -> shuffle (seeded; reshuffled every epoch by Grain's repeat)
    -> decode / augment / tokenise / mask   (RandomMap: rng = f(seed, index))
    -> drop bad records (counted)  -> batch(local batch)  -> worker processes
    -> SkipAccountingIterator (data/skipped, limit, layout check)

Every step is a function of the element index, so `get_state()` (positions
only) restores exactly, with or without worker processes.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from florax.data import bad_records
from florax.data import masking
from florax.data import transforms
from florax.data.tokenizer import Tokenizer, load_tokenizer


def default_data_config() -> ml_collections.ConfigDict:
  """Every field `make_train_iterator` reads, with defaults."""
  return ml_collections.ConfigDict(dict(
      source="records",        # "records" | "captions" | "tfds"
      path="",                 # records: dataset dir; captions: CSV/JSONL
      split="train",           # records: "train" | "validation" (holdout)
      image_root="",           # captions: folder of the image paths
      tfds=dict(name="", split="train", data_dir="", image_key="image",
                text_key="", label_key="label", id_key=""),
      batch_size=256,          # global; each process gets batch_size / count
      seed=0,
      shuffle=True,
      num_epochs=0,            # 0: repeat forever
      # image
      image=True,
      image_size=224,
      train_augment=True,      # RandomResizedCrop + flip; False: centre crop
      crop_scale=(0.08, 1.0),  # EVA: (0.2, 1.0)
      crop_ratio=(3 / 4, 4 / 3),
      flip=True,
      color_jitter=0.0,        # BEiT-3: 0.4
      crop_fraction=0.875,
      mean=transforms.CLIP_MEAN,
      std=transforms.CLIP_STD,
      # text
      text=True,
      tokenizer_path="",       # or pass tokenizer= to make_train_iterator
      # "" = by file name (tokenizer.json: CLIP BPE; else florax's
      # SentencePiece); or a florax.data.tokenizer kind
      tokenizer_kind="",
      max_text_len=77,
      use_templates=True,
      drop_templated=False,    # Florence stage 2
      # masked modeling
      image_mask=dict(enabled=False, patch_size=16, ratio=0.4, min_block=16),
      text_mask=dict(enabled=False, rate=0.15, mask_id=-1),  # -1: vocab size
      # bad data
      max_skip_fraction=0.01,
      min_seen_for_skip_limit=1000,
      # performance
      num_workers=0,
      worker_buffer_size=2,
      read_threads=16,
      read_buffer=64,
  ))


# Fields a task fills in from its own config (image size, text length, batch,
# seed, source): a family config leaves them out of its `data.records`, so
# no field is silently ignored.
TASK_OWNED_FIELDS = ("source", "image_size", "max_text_len", "batch_size",
                     "seed")


def user_data_config() -> ml_collections.ConfigDict:
  """`default_data_config()` without the task-owned fields."""
  fields = default_data_config().to_dict()
  return ml_collections.ConfigDict({k: v for k, v in fields.items()
                                    if k not in TASK_OWNED_FIELDS})


def make_source(cfg: ml_collections.ConfigDict):
  """The random-access source named by `cfg.source`."""
  if cfg.source == "records":
    from florax.data.records import RecordSource  # pylint: disable=g-import-not-at-top
    return RecordSource(cfg.path, cfg.get("split", "train"))
  if cfg.source == "captions":
    from florax.data.folder_source import CaptionFolderSource  # pylint: disable=g-import-not-at-top
    return CaptionFolderSource(cfg.path, cfg.image_root or None)
  if cfg.source == "tfds":
    from florax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
    t = cfg.tfds
    return TfdsSource(t.name, t.split, t.data_dir or None, t.image_key,
                      t.text_key or None, t.label_key or None,
                      t.id_key or None)
  raise ValueError(f"data.source must be 'records', 'captions' or 'tfds', "
                   f"got {cfg.source!r}")


def process_layout(process_index: int | None, process_count: int | None
                   ) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in "
                     f"[0, {process_count})")
  return process_index, process_count


def example_transforms(cfg, tokenizer: Tokenizer | None) -> list:
  """The RandomMap chain applied to each record."""
  image = None
  if cfg.image:
    image = transforms.ImageTransform(
        size=cfg.image_size, train=cfg.train_augment,
        scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
        flip=cfg.flip, color_jitter=cfg.color_jitter,
        crop_fraction=cfg.crop_fraction, mean=tuple(cfg.mean),
        std=tuple(cfg.std))
  text = None
  if cfg.text:
    if tokenizer is None:
      if not cfg.tokenizer_path:
        raise ValueError("data.text is on: pass tokenizer= or set "
                         "data.tokenizer_path")
      tokenizer = load_tokenizer(cfg.tokenizer_path)
    text = transforms.TextTransform(
        tokenizer, cfg.max_text_len, use_templates=cfg.use_templates,
        drop_templated=cfg.drop_templated)
  chain = [transforms.ExampleTransform(image=image, text=text)]
  if cfg.image_mask.enabled:
    if cfg.image_size % cfg.image_mask.patch_size:
      raise ValueError(f"image_size {cfg.image_size} is not a multiple of "
                       f"patch_size {cfg.image_mask.patch_size}")
    side = cfg.image_size // cfg.image_mask.patch_size
    chain.append(masking.BlockMasking(
        grid=(side, side), ratio=cfg.image_mask.ratio,
        min_block=cfg.image_mask.min_block))
  if cfg.text_mask.enabled:
    if text is None:
      raise ValueError("data.text_mask needs data.text")
    tok = text.tokenizer
    vocab = tok.vocab_size
    mask_id = cfg.text_mask.mask_id if cfg.text_mask.mask_id >= 0 else (
        getattr(tok, "mask_id", vocab))
    chain.append(masking.BertMasking(vocab_size=vocab, mask_id=mask_id,
                                     rate=cfg.text_mask.rate,
                                     special_ids=tok.special_ids))
  return chain


def make_train_iterator(cfg: ml_collections.ConfigDict, *,
                        tokenizer: Tokenizer | None = None,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        source: Any = None,
                        chain: list | None = None
                        ) -> bad_records.SkipAccountingIterator:
  """This process's iterator of local batches (numpy dicts).

  Args:
    cfg: the `data` ConfigDict (see `default_data_config`).
    tokenizer: SentencePiece tokenizer (else loaded from cfg.tokenizer_path).
    process_index, process_count: the JAX process layout (default: jax's).
    source: a random-access source overriding `cfg.source`.
    chain: RandomMap transforms replacing `example_transforms(cfg, ...)`
      (e.g. video_records.ClipTransform); they turn bad records into
      bad_records markers as ExampleTransform does.

  Returns:
    A Grain DatasetIterator with get_state/set_state, `metrics()` for
    `data/skipped`, and `close()`. Batches hold `image` float32
    (b, H, W, 3), `text` int32 (b, L), `label` int32 (b,), plus
    `image_mask` / `text_mask` / `text_targets` when masking is on.
  """
  index, count = process_layout(process_index, process_count)
  if cfg.batch_size % count:
    raise ValueError(f"data.batch_size {cfg.batch_size} is not divisible by "
                     f"the {count} processes")
  local_batch = cfg.batch_size // count
  src = source if source is not None else make_source(cfg)
  if len(src) < count:
    raise ValueError(f"{len(src)} records cannot feed {count} processes")
  ds = grain.MapDataset.source(src)[index::count]
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs or None)
  if chain is None:
    chain = example_transforms(cfg, tokenizer)
  for i, t in enumerate(chain):
    # seeds differ per process: the shards differ, so must the augmentations
    seed = np.random.SeedSequence([cfg.seed, index, i]).generate_state(1)[0]
    ds = ds.random_map(t, seed=int(seed))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
  it = bad_records.SkipBadRecordsIterDataset(
      it, cfg.max_skip_fraction, cfg.min_seen_for_skip_limit)
  it = it.batch(local_batch, drop_remainder=True)
  if cfg.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.num_workers,
        per_worker_buffer_size=cfg.worker_buffer_size))
  layout = {"process_index": index, "process_count": count,
            "num_workers": int(cfg.num_workers), "local_batch": local_batch}
  return bad_records.SkipAccountingIterator(
      iter(it), cfg.max_skip_fraction, cfg.min_seen_for_skip_limit, layout)


def global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict:
  """Per-process numpy batch -> global jax.Arrays (leading axis = batch).

  Args:
    local_batch: this process's share, e.g. from `make_train_iterator`.
    sharding: a `jax.sharding.Sharding` for the global arrays (batch dim
      sharded over the data axes), or a dict of them per key.

  Returns:
    dict of global `jax.Array`s.
  """
  import jax  # pylint: disable=g-import-not-at-top
  return {k: jax.make_array_from_process_local_data(
      sharding[k] if isinstance(sharding, dict) else sharding, v)
          for k, v in local_batch.items()}
