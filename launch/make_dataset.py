"""Converts images + texts into a florax records directory.

  python -m launch.make_dataset --captions=caps.csv --out=/data/mine
  python -m launch.make_dataset --webdataset='/data/wds/*.tar' --out=/data/cc
  python -m launch.make_dataset --class_folders=/data/flowers --out=/data/fl \
      --holdout_fraction=0.02

--captions takes CSV (header: path,caption[,label]) or JSONL; paths are
relative to --image_root (default: the captions file's folder).

Video: a path (captions) or class-folder entry that is a FOLDER of frame
images is one clip, stored as a record of its encoded frames in file-name
order (zero-pad the frame numbers); e.g. frames extracted with
`ffmpeg -i clip.mp4 -vf fps=8 clip/%05d.jpg` into /data/k400/<class>/<clip>/:
  python -m launch.make_dataset --class_folders=/data/k400 --out=/data/k400r

Detection (COCO format): one split per call, into the same --out:
  python -m launch.make_dataset --coco_instances=ann/instances_train2017.json \
      --coco_images=train2017 --out=/data/coco --split=train
  python -m launch.make_dataset --coco_instances=ann/instances_val2017.json \
      --coco_images=val2017 --out=/data/coco --split=validation
Boxes outside the image, unknown category ids, missing or undecodable
image files are skipped and counted by reason (metadata.json "skipped").

Every image is decoded once and truncated or corrupt ones are skipped
(--noverify_images skips the check; bad images then surface in training).

--holdout_fraction=F puts a fraction F (0 <= F < 1) of the records into a
`validation` split of the same directory, the rest into `train`; a hash of
the record id decides, so the split does not depend on --num_workers or the
input order. Read a split with `records.RecordSource(dir, split=...)` (in a
config: data.records.split). Class names and the UniCL label table cover
both splits.

An existing non-empty --out is refused; --overwrite replaces the dataset in
it. The new dataset is built in <out>.partial-<pid> beside it and swapped in
only when complete, so a failed conversion leaves the old one untouched.
Exits non-zero, with the first skip reasons, when no record was written.
"""

from __future__ import annotations

import glob
import os
import sys

from absl import app
from absl import flags

from florax.data import converters

_CAPTIONS = flags.DEFINE_string("captions", "", "CSV/JSONL captions file.")
_IMAGE_ROOT = flags.DEFINE_string("image_root", "", "Root of caption paths.")
_WDS = flags.DEFINE_string("webdataset", "", "Glob of webdataset tar files.")
_CLASSES = flags.DEFINE_string("class_folders", "",
                               "Folder with one subfolder per class.")
_COCO = flags.DEFINE_string("coco_instances", "",
                            "COCO instances JSON (detection).")
_COCO_IMAGES = flags.DEFINE_string("coco_images", "",
                                   "Folder of the COCO json's file_names.")
_SPLIT = flags.DEFINE_string("split", "train",
                             "--coco_instances: the split it becomes.")
_OUT = flags.DEFINE_string("out", "", "Output dataset directory (new).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace the dataset already in --out.")
_HOLDOUT = flags.DEFINE_float("holdout_fraction", 0.0,
                              "Fraction of records in a `validation` split.")
_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                "Conversion processes.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 10_000,
                                  "Records per ArrayRecord shard.")
_VERIFY = flags.DEFINE_bool("verify_images", True,
                            "Decode every image; skip truncated/corrupt ones.")


def _convert() -> dict:
  if _COCO.value:
    from florax.data import coco  # pylint: disable=g-import-not-at-top
    return coco.convert_coco(
        _COCO.value, _COCO_IMAGES.value or os.path.dirname(_COCO.value),
        _OUT.value, split=_SPLIT.value, overwrite=_OVERWRITE.value,
        records_per_shard=_PER_SHARD.value, verify_images=_VERIFY.value)
  common = dict(num_workers=_WORKERS.value, verify_images=_VERIFY.value,
                holdout_fraction=_HOLDOUT.value, overwrite=_OVERWRITE.value)
  if _CAPTIONS.value:
    return converters.convert_captions(
        _CAPTIONS.value, _OUT.value, image_root=_IMAGE_ROOT.value or None,
        records_per_shard=_PER_SHARD.value, **common)
  if _WDS.value:
    tars = sorted(glob.glob(_WDS.value))
    if not tars:
      raise app.UsageError(f"--webdataset={_WDS.value} matches no file")
    return converters.convert_webdataset(tars, _OUT.value, **common)
  return converters.convert_class_folders(
      _CLASSES.value, _OUT.value, records_per_shard=_PER_SHARD.value,
      **common)


def main(argv):
  del argv
  chosen = [f for f in (_CAPTIONS.value, _WDS.value, _CLASSES.value,
                        _COCO.value) if f]
  if len(chosen) != 1 or not _OUT.value:
    raise app.UsageError("give --out and exactly one of --captions, "
                         "--webdataset, --class_folders, --coco_instances")
  try:
    meta = _convert()
  except (converters.ConversionError, FileExistsError, ValueError) as e:
    sys.exit(f"make_dataset: {e}")  # a message, exit status 1
  splits = ", ".join(f"{name} {s['num_records']} records in "
                     f"{len(s['shards'])} shards"
                     for name, s in meta["splits"].items())
  print(f"wrote {splits} to {_OUT.value}; {len(meta['unicl']['table'])} "
        f"distinct descriptions; skipped {meta['skipped']['count']}")
  for s in meta["skipped"]["records"][:20]:
    print(f"  skipped {s['id']}: {s['reason']}")


if __name__ == "__main__":
  app.run(main)
