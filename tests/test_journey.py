"""The journey of README's "Your own data, end to end", through the CLIs.

A captions dataset is generated here: drawn circles, squares and triangles
in four colours (on plain grounds or on crops of scikit-learn's temple
photo) and crops/rescales of its flower photo, 32-64 px JPEGs and PNGs,
four classes (the CSV's label column). Four rows are bad: a corrupt JPEG, a
missing file, an empty caption and a caption in raw latin-1 bytes. Then, as
a user would:

  python -m launch.make_dataset --captions=CSV --image_root=DIR --out=DATA
      --holdout_fraction=0.25                  -> the 4 bad rows skipped
  python -m launch.train ... (records, zero-shot + retrieval evals on the
      validation split)                        -> eval/* logged at the end
  python -m launch.evaluate --workdir W        -> the same values
  python -m launch.export --workdir W --out W/export
  florax.inference.load(W/export).zero_shot(validation images)
                                               -> the logged top-1, exactly
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time

import numpy as np
from PIL import Image, ImageDraw

from tests import trained_tiny

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40),
           "blue": (30, 60, 220), "yellow": (235, 215, 20)}
SHAPES = ("circle", "square", "triangle")
PER_CLASS = 50  # 4 classes: 200 good images
STEPS = 50
BATCH = 32
HOLDOUT = 0.25
# Written as raw bytes into the CSV: "un carré" in latin-1, not UTF-8.
LATIN1_CAPTION = "un carr\xe9 bleu".encode("latin-1")
BAD = {  # id (path relative to --image_root) -> make_dataset's reason
    "photos/corrupt.jpg": "undecodable image",
    "photos/missing.png": "cannot read image file",
    "photos/empty_caption.png": "text is empty",
    "photos/latin1_caption.png": "text is not valid UTF-8",
}


def _draw_shape(img, shape, colour, rng):
  size = img.size[0]
  r = size * rng.uniform(0.25, 0.4)
  cx = size / 2 + rng.uniform(-0.1, 0.1) * size
  cy = size / 2 + rng.uniform(-0.1, 0.1) * size
  d = ImageDraw.Draw(img)
  fill = COLOURS[colour]
  if shape == "circle":
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  elif shape == "square":
    d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
  else:
    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_captions_dataset(root: str, seed: int = 0) -> tuple[str, int]:
  """Writes root/photos/* and root/captions.csv; returns (csv, good rows)."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  temple, flower = load_sample_images().images  # 427 x 640 RGB each
  os.makedirs(os.path.join(root, "photos"))

  def crop(photo, min_side, size):
    h, w, _ = photo.shape
    s = int(rng.integers(min_side, min(h, w)))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    return Image.fromarray(photo[y:y + s, x:x + s]).resize(
        (size, size), Image.BILINEAR)

  rows = []
  for i in range(PER_CLASS):
    for shape in SHAPES:
      size = int(rng.integers(32, 65))
      colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
      on_photo = rng.random() < 0.5
      if on_photo:
        img = crop(temple, 48, size)
      else:
        g = int(rng.integers(180, 256))
        img = Image.new("RGB", (size, size), (g, g, g))
      _draw_shape(img, shape, colour, rng)
      name = f"photos/{shape}_{i:03d}." + ("jpg" if i % 2 else "png")
      img.save(os.path.join(root, name))
      ground = " on a temple photo" if on_photo else ""
      rows.append([name, f"a {colour} {shape}{ground}", shape])
    name = f"photos/flower_{i:03d}.jpg"
    crop(flower, 64, int(rng.integers(32, 65))).save(
        os.path.join(root, name), quality=90)
    rows.append([name, "a photo of a flower" if i % 2
                 else "a pink flower close up", "flower"])
  good = len(rows)

  # The bad rows. Each has a valid label, so the class names stay the four.
  with open(os.path.join(root, "photos/corrupt.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0" + rng.bytes(600))  # a JPEG header, then noise
  for name in ("empty_caption.png", "latin1_caption.png"):
    img = Image.new("RGB", (40, 40), (200, 200, 200))
    _draw_shape(img, "square", "blue", rng)
    img.save(os.path.join(root, "photos", name))
  rows += [["photos/corrupt.jpg", "a red circle", "circle"],
           ["photos/missing.png", "a green triangle", "triangle"],
           ["photos/empty_caption.png", "", "square"]]
  order = rng.permutation(len(rows))  # bad rows among the good ones
  rows = [rows[i] for i in order]

  path = os.path.join(root, "captions.csv")
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["path", "caption", "label"])
  writer.writerows(rows)
  with open(path, "wb") as f:
    f.write(buf.getvalue().encode("utf-8"))
    f.write(b"photos/latin1_caption.png," + LATIN1_CAPTION + b",square\n")
  return path, good


def _eval_row(workdir: str, step: int) -> dict:
  """The eval/ metrics of `step` in metrics.jsonl (exactly one row)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in rows if r["step"] == step and any(
      k.startswith("eval/") for k in r)]
  assert len(evals) == 1, evals
  return {k: v for k, v in evals[0].items() if k.startswith("eval/")}


def _printed(line_prefix: str, stdout: str) -> dict[str, str]:
  """{metric: printed value} of the console line starting `line_prefix`."""
  line, = [l for l in stdout.splitlines() if l.startswith(line_prefix)]
  return dict(re.findall(r"(eval/\S+) (\d\.\d{4})", line))


def test_own_data_end_to_end(tmp_path):
  times = {}
  t = time.perf_counter()
  captions, good = make_captions_dataset(str(tmp_path / "raw"))
  data = str(tmp_path / "data")
  workdir = str(tmp_path / "run")
  export_dir = os.path.join(workdir, "export")
  times["generate"] = time.perf_counter() - t

  # 1. Convert: the four bad rows are skipped and named, the rest split.
  t = time.perf_counter()
  proc = trained_tiny.run_cli(
      "launch.make_dataset", f"--captions={captions}",
      f"--image_root={tmp_path / 'raw'}", f"--out={data}",
      f"--holdout_fraction={HOLDOUT}", "--num_workers=1")
  times["make_dataset"] = time.perf_counter() - t
  assert re.search(r"; skipped 4\n", proc.stdout), proc.stdout
  for record_id, reason in BAD.items():
    assert f"  skipped {record_id}: {reason}" in proc.stdout, proc.stdout
  with open(os.path.join(data, "metadata.json"), encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["skipped"]["count"] == 4
  assert {s["id"] for s in meta["skipped"]["records"]} == set(BAD)
  assert meta["class_names"] == ["circle", "flower", "square", "triangle"]
  n_train = meta["splits"]["train"]["num_records"]
  n_val = meta["splits"]["validation"]["num_records"]
  assert n_train + n_val == good == 200
  assert 0.15 * good < n_val < 0.35 * good, (n_train, n_val)
  assert f"wrote train {n_train} records" in proc.stdout
  assert f"validation {n_val} records" in proc.stdout

  # 2. Train with zero-shot and retrieval evaluated on the held-out split.
  evals = []
  for name in ("zeroshot", "retrieval"):
    evals += [f"--config.evals.{name}.data.source=records",
              f"--config.evals.{name}.data.path={data}",
              f"--config.evals.{name}.data.split=validation"]
  t = time.perf_counter()
  proc = trained_tiny.run_cli(
      "launch.train", "--config", "configs/florence.py:tiny",
      "--workdir", workdir,
      "--config.data.name=records", f"--config.data.records.path={data}",
      "--config.data.records.crop_scale=(0.5, 1.0)",
      f"--config.train.steps={STEPS}", f"--config.train.batch_size={BATCH}",
      f"--config.train.eval_every={STEPS}",
      "--config.optimizer.warmup_steps=5",
      "--config.evals.zeroshot.templates=training",
      "--config.evals.retrieval.enabled=True", *evals)
  times["train"] = time.perf_counter() - t
  logged = _eval_row(workdir, STEPS)
  metric_names = {"eval/zeroshot_top1"} | {
      f"eval/retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
  # top5 is dropped: there are 4 classes.
  assert set(logged) == metric_names, sorted(logged)
  printed = _printed(f"florax: eval at step {STEPS}:", proc.stdout)
  assert printed == {k: f"{v:.4f}" for k, v in logged.items()}, proc.stdout
  assert logged["eval/zeroshot_top1"] >= 0.4, logged  # chance: 0.25
  for d in ("i2t", "t2i"):
    r = [logged[f"eval/retrieval_{d}_r{k}"] for k in (1, 5, 10)]
    assert 0 <= r[0] <= r[1] <= r[2] <= 1, logged
  assert logged["eval/retrieval_t2i_r10"] > 10 / n_val, logged  # chance
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["evals"]["zeroshot"]["data"]["path"] == data

  # 3. Re-evaluate from the workdir alone: the logged values, exactly.
  t = time.perf_counter()
  proc = trained_tiny.run_cli("launch.evaluate", "--workdir", workdir)
  times["evaluate"] = time.perf_counter() - t
  printed = _printed(f"florax: eval of {workdir} at step {STEPS}:",
                     proc.stdout)
  assert printed == {k: f"{v:.4f}" for k, v in logged.items()}, proc.stdout
  assert _eval_row(workdir, STEPS) == logged  # the replaced row

  # 4. Export from the workdir alone.
  t = time.perf_counter()
  proc = trained_tiny.run_cli("launch.export", "--workdir", workdir,
                              "--out", export_dir)
  times["export"] = time.perf_counter() - t
  assert f"florax: exported step {STEPS}" in proc.stdout, proc.stdout
  with open(os.path.join(export_dir, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  from florax.data import prompts  # pylint: disable=g-import-not-at-top
  assert manifest["zeroshot"] == {"class_names": meta["class_names"],
                                  "templates": list(prompts.FLORENCE_TEMPLATES)}
  assert manifest["preprocess"]["transform"] == "center_crop"

  # 5. Inference on the held-out images, as a user reads them.
  from florax import inference  # pylint: disable=g-import-not-at-top
  from florax.data import records  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  source = records.RecordSource(data, "validation")
  examples = [source[i] for i in range(len(source))]
  images = [Image.open(io.BytesIO(r["image"])) for r in examples]
  labels = np.array([r["label"] for r in examples])
  assert sorted(set(labels.tolist())) == [0, 1, 2, 3]
  model = inference.load(export_dir)
  result = model.zero_shot(images)  # the manifest's class names and templates
  times["inference"] = time.perf_counter() - t
  assert result.class_names == meta["class_names"]
  top1 = float(np.mean(result.class_ids == labels))
  assert top1 == logged["eval/zeroshot_top1"], (top1, logged)
  # Not one class for everything: at least three classes predicted right.
  assert len(set(labels[result.class_ids == labels].tolist())) >= 3, (
      result.predictions)

  # The export's zero-shot defaults are the evaluator's own: with another
  # template set the manifest would offer that one (no training needed).
  from florax import config_io, tasks  # pylint: disable=g-import-not-at-top
  from florax.evaluate import zeroshot  # pylint: disable=g-import-not-at-top
  cfg = config_io.load(workdir)
  cfg.evals.zeroshot.templates = "imagenet"
  defaults = tasks.build(cfg, workdir).zeroshot_defaults()
  assert defaults == {"class_names": meta["class_names"],
                      "templates": list(zeroshot.IMAGENET_TEMPLATES)}
  print("journey timings (s): " + ", ".join(
      f"{k} {v:.1f}" for k, v in times.items())
        + f"; total {sum(times.values()):.1f}; zero-shot top-1 {top1:.4f} "
        f"on {n_val} held-out images ({n_train} train)")
