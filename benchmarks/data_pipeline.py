"""Images/s of decode + RandomResizedCrop(224) + flip + normalise + batch.

Real JPEGs: random crops of scikit-learn's two sample photos, re-encoded
(quality 90) into a temporary florax records directory. Grain runs with 0, 1
and 2 worker processes (one read thread per process, so a row uses as many
cores as it has processes); a PyTorch DataLoader does the same work with the
same worker counts when torch is importable.

Two transforms: "fused" (florax: crop box from the header, JPEG draft-mode
decode at reduced DCT scale, one resize) and "plain" (full decode, crop,
resize: what torchvision's RandomResizedCrop does on PIL images), so loader
and decoder effects show separately.

  python -m benchmarks.data_pipeline [--images 300] [--batches 8] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from PIL import Image


def make_jpegs(n: int, out_dir: str, seed: int = 0) -> str:
  """n random crops of the sklearn photos as JPEGs + a captions file."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  with open(os.path.join(out_dir, "caps.jsonl"), "w") as f:
    for i in range(n):
      photo = photos[i % len(photos)]
      h = int(rng.integers(240, photo.shape[0] + 1))
      w = int(rng.integers(320, photo.shape[1] + 1))
      y = int(rng.integers(0, photo.shape[0] - h + 1))
      x = int(rng.integers(0, photo.shape[1] - w + 1))
      buf = io.BytesIO()
      Image.fromarray(photo[y:y + h, x:x + w]).save(buf, format="JPEG",
                                                     quality=90)
      with open(os.path.join(out_dir, f"{i}.jpg"), "wb") as g:
        g.write(buf.getvalue())
      f.write(json.dumps({"path": f"{i}.jpg", "caption": "photo"}) + "\n")
  return os.path.join(out_dir, "caps.jsonl")


class PlainRandomResizedCrop:
  """Full decode, then crop + resize + flip + normalise (torchvision-style)."""

  def __init__(self, size=224):
    from florax.data import transforms  # pylint: disable=g-import-not-at-top
    self.size = size
    self.mean = np.asarray(transforms.CLIP_MEAN, np.float32)
    self.inv_std = 1 / np.asarray(transforms.CLIP_STD, np.float32)

  def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
    from florax.data import transforms  # pylint: disable=g-import-not-at-top
    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = transforms.random_resized_crop_box(*img.size, rng)
    x = np.asarray(img.resize((self.size, self.size), Image.BILINEAR, box=box),
                   np.float32) * np.float32(1 / 255)
    if rng.random() < 0.5:
      x = x[:, ::-1]
    return np.ascontiguousarray((x - self.mean) * self.inv_std)


def bench_grain(dataset_dir, workers, batch, batches, transform):
  import grain  # pylint: disable=g-import-not-at-top
  from florax.data import record_pipeline  # pylint: disable=g-import-not-at-top
  cfg = record_pipeline.default_data_config()
  cfg.update(dict(path=dataset_dir, batch_size=batch, text=False,
                  num_workers=workers, read_threads=1, read_buffer=batch,
                  worker_buffer_size=2))
  if transform == "plain":
    src = record_pipeline.make_source(cfg)
    ds = grain.MapDataset.source(src).shuffle(seed=0).repeat()
    ds = ds.random_map(_PlainGrainMap(), seed=1)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                              prefetch_buffer_size=batch))
    it = it.batch(batch, drop_remainder=True)
    if workers:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    it = iter(it)
  else:
    it = record_pipeline.make_train_iterator(cfg, process_index=0,
                                             process_count=1)
  next(it)  # start-up (worker spawn) is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    assert b["image"].shape == (batch, 224, 224, 3)
  rate = batches * batch / (time.perf_counter() - start)
  getattr(it, "close", lambda: None)()
  return rate


import grain as _grain  # pylint: disable=g-import-not-at-top,g-bad-import-order


class _PlainGrainMap(_grain.transforms.RandomMap):
  """Grain RandomMap of the plain transform (picklable)."""

  def __init__(self):
    self.t = PlainRandomResizedCrop()

  def random_map(self, element, rng):
    return {"image": self.t(element["image"], rng)}


class _TorchStyleDataset:
  """Map-style dataset for torch's DataLoader (module level: spawn pickles)."""

  def __init__(self, dataset_dir, transform):
    from florax.data import records, transforms  # pylint: disable=g-import-not-at-top
    self.src = records.RecordSource(dataset_dir)
    self.transform = transform
    self.fused = transforms.ImageTransform(size=224)
    self.plain = PlainRandomResizedCrop()

  def __len__(self):
    return 10**9

  def __getitem__(self, i):
    import torch  # pylint: disable=g-import-not-at-top
    rec = self.src[i % len(self.src)]
    rng = np.random.default_rng(i)
    x = (self.plain(rec["image"], rng) if self.transform == "plain" else
         self.fused("x", rec["image"], rng))
    return torch.from_numpy(x)


def bench_torch(dataset_dir, workers, batch, batches, transform):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  loader = torch.utils.data.DataLoader(
      _TorchStyleDataset(dataset_dir, transform), batch_size=batch,
      num_workers=workers, shuffle=False,
      prefetch_factor=2 if workers else None,
      multiprocessing_context="spawn" if workers else None)
  it = iter(loader)
  next(it)  # start-up (worker spawn) is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    assert tuple(b.shape) == (batch, 224, 224, 3)
  rate = batches * batch / (time.perf_counter() - start)
  del it
  return rate


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=300)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--json", action="store_true")
  args = p.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
  from florax.data import converters  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp()
  try:
    caps = make_jpegs(args.images, tmp)
    converters.convert_captions(caps, os.path.join(tmp, "ds"),
                                records_per_shard=100, progress=False)
    ds = os.path.join(tmp, "ds")
    rows = []
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
      have_torch = True
    except ImportError:
      have_torch = False
    for w in [int(x) for x in args.workers.split(",")]:
      for transform in ("fused", "plain"):
        rows.append({"loader": "grain", "transform": transform, "workers": w,
                     "images_per_s": bench_grain(ds, w, args.batch,
                                                 args.batches, transform)})
        if have_torch:
          rows.append({"loader": "torch DataLoader", "transform": transform,
                       "workers": w,
                       "images_per_s": bench_torch(ds, w, args.batch,
                                                   args.batches, transform)})
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  info = {"machine": f"{platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} cores",
          "date": time.strftime("%Y-%m-%d"), "images": args.images,
          "batch": args.batch, "torch": have_torch, "rows": rows}
  if args.json:
    print(json.dumps(info, indent=1))
    return
  print(f"# {info['machine']}, {info['date']}, {args.images} JPEGs, batch "
        f"{args.batch}")
  print("| loader | transform | workers | images/s |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['loader']} | {r['transform']} | {r['workers']} | "
          f"{r['images_per_s']:.0f} |")
  if not have_torch:
    print("torch not importable: PyTorch DataLoader peer not measured")


if __name__ == "__main__":
  main()
