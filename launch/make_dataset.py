"""Converts images + texts into a florax records directory.

  python -m launch.make_dataset --captions=caps.csv --out=/data/mine
  python -m launch.make_dataset --webdataset='/data/wds/*.tar' --out=/data/cc
  python -m launch.make_dataset --class_folders=/data/flowers --out=/data/fl

--captions takes CSV (header: path,caption[,label]) or JSONL; paths are
relative to --image_root (default: the captions file's folder).
"""

from __future__ import annotations

import glob
import os

from absl import app
from absl import flags

from florax.data import converters

_CAPTIONS = flags.DEFINE_string("captions", "", "CSV/JSONL captions file.")
_IMAGE_ROOT = flags.DEFINE_string("image_root", "", "Root of caption paths.")
_WDS = flags.DEFINE_string("webdataset", "", "Glob of webdataset tar files.")
_CLASSES = flags.DEFINE_string("class_folders", "",
                               "Folder with one subfolder per class.")
_OUT = flags.DEFINE_string("out", "", "Output dataset directory (new).")
_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                "Conversion processes.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 10_000,
                                  "Records per ArrayRecord shard.")
_VERIFY = flags.DEFINE_bool("verify_images", False,
                            "Skip images PIL cannot parse (slower).")


def main(argv):
  del argv
  chosen = [f for f in (_CAPTIONS.value, _WDS.value, _CLASSES.value) if f]
  if len(chosen) != 1 or not _OUT.value:
    raise app.UsageError("give --out and exactly one of --captions, "
                         "--webdataset, --class_folders")
  if _CAPTIONS.value:
    meta = converters.convert_captions(
        _CAPTIONS.value, _OUT.value, image_root=_IMAGE_ROOT.value or None,
        num_workers=_WORKERS.value, records_per_shard=_PER_SHARD.value,
        verify_images=_VERIFY.value)
  elif _WDS.value:
    tars = sorted(glob.glob(_WDS.value))
    if not tars:
      raise app.UsageError(f"--webdataset={_WDS.value} matches no file")
    meta = converters.convert_webdataset(
        tars, _OUT.value, num_workers=_WORKERS.value,
        verify_images=_VERIFY.value)
  else:
    meta = converters.convert_class_folders(
        _CLASSES.value, _OUT.value, num_workers=_WORKERS.value,
        records_per_shard=_PER_SHARD.value, verify_images=_VERIFY.value)
  print(f"wrote {meta['num_records']} records in {len(meta['shards'])} "
        f"shards to {_OUT.value}; {len(meta['unicl']['table'])} distinct "
        f"descriptions; skipped {meta['skipped']['count']}")
  for s in meta["skipped"]["records"][:20]:
    print(f"  skipped {s['id']}: {s['reason']}")


if __name__ == "__main__":
  app.run(main)
