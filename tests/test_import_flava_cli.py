"""`python -m launch.import_weights --source hf`: a Hugging Face FLAVA
checkpoint (FlavaModel, or FlavaForPreTraining with its heads and image
codebook) becomes an import directory (launch.import_weights.
write_import_dir) that config.init_from and florax.models.flava read.

The small random FlavaModel of tests/fixtures/hf_flava_tiny.npz (arch
'test'; its model-level parity is tests/test_flava_model.py) is saved as a
FlavaForPreTraining .safetensors ('flava.' prefix, an mlm_head tensor, the
image codebook of hf_flava_codebook_tiny.npz) and run through the CLI as a
user runs it; the directory's params and config.json rebuild Flava, whose
outputs must equal transformers' recorded ones (atol 1e-4). Mistakes stop
before anything is written."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from florax.convert import hf_flava
from florax.export import unflatten_params
from florax.models import flava, flava_codebook
from tests.fixtures import make_hf_flava as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4
VOCAB = 99  # hf_flava arch 'test': text vocab_size
WORDS = ("a", "photo", "of", "the", "cat", "dog", "##s", "sit", "##ting",
         "on", "mat", ".", ",")
TEXT = "A photo of the cats, sitting on a MAT."
# [CLS] a photo of the cat ##s , sit ##ting on a mat . [SEP] [PAD]
IDS = [2, 5, 6, 7, 8, 9, 11, 17, 12, 13, 14, 5, 15, 16, 3, 0]


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "launch.import_weights",
                         *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _write_vocab(path, size=VOCAB):
  """A BERT-style vocab.txt of `size` ids: [PAD] 0, [UNK] 1, [CLS] 2,
  [SEP] 3, [MASK] 4, WORDS, then [unused*] rows."""
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
  tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
  path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def fixture():
  return ref.load(ref.FIXTURE)


@pytest.fixture(scope="module")
def files(fixture, tmp_path_factory):
  """The fixture as checkpoints a user has: FlavaModel's state dict, the
  same as FlavaForPreTraining's (with a head and the codebook), and a
  vocab.txt."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("hf_flava")
  state = fixture[0]
  codebook, _, _, _ = ref.load(ref.CODEBOOK_FIXTURE)
  save_file(state, str(d / "model.safetensors"))
  pre = {f"flava.{k}": v for k, v in state.items()}
  pre.update({f"image_codebook.{k}": v for k, v in codebook.items()})
  pre["mlm_head.decoder.weight"] = np.ones((VOCAB, 40), np.float32)
  save_file(pre, str(d / "pretraining.safetensors"))
  return {"model": d / "model.safetensors",
          "pretraining": d / "pretraining.safetensors",
          "vocab": _write_vocab(d / "vocab.txt"), "dir": d}


@pytest.fixture(scope="module")
def imported(files):
  out, cb = files["dir"] / "flava", files["dir"] / "codebook"
  res = _run("--source", "hf", "--arch", "test", "--checkpoint",
             files["pretraining"], "--out", out, "--tokenizer",
             files["vocab"], "--codebook_out", cb)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "florax: imported hf FLAVA test (" in res.stdout
  assert "florax: imported hf FLAVA test's image codebook" in res.stdout
  return out, cb, res.stdout


def _load_dir(path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(path, "manifest.json")) as f:
    manifest = json.load(f)
  return config, load_file(os.path.join(path, "params.safetensors")), manifest


def _flava_outputs(cfg, params, x):
  """The fixture's outputs from florax's Flava (test_flava_model's way)."""
  got = ref.florax_outputs_fn(cfg)(
      unflatten_params({k: jnp.asarray(v) for k, v in params.items()}),
      *ref.run_inputs(x))
  return {k: np.asarray(got[k]) for k in ref.OUTPUTS}


def test_import_directory_rebuilds_hf_flava(fixture, imported):
  """config.json alone rebuilds the model; with the directory's params it
  gives transformers' outputs."""
  state, x, outs, _ = fixture
  config, params, manifest = _load_dir(imported[0])
  assert config["model"]["arch"] == "flava"
  cfg = flava.from_dict(config["model"]["flava"])
  assert cfg == hf_flava.arch_config("test")
  assert config["data"]["image_size"] == cfg.image_size == 32
  assert config["data"]["max_len"] == cfg.max_len == 16
  assert config["init_from"]["path"] == os.path.abspath(imported[0])
  # Exactly the converter's params (FlavaModel's: the heads are not there).
  _, want, _ = hf_flava.convert_state_dict(state, "test")
  assert sorted(params) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  assert manifest["num_params"] == sum(v.size for v in want.values())
  got = _flava_outputs(cfg, params, x)
  diffs = {k: float(np.abs(got[k] - outs[k]).max()) for k in ref.OUTPUTS}
  print("max |florax - HF| through the CLI:", max(diffs.values()))
  assert max(diffs.values()) <= ATOL, diffs


def test_init_from_reads_the_import(imported):
  """init_from.path (config.json's own) reads every Flava param by name
  and shape."""
  from florax.train import init_from  # pylint: disable=g-import-not-at-top
  config, _, _ = _load_dir(imported[0])
  flat, what = init_from.read_source(config["init_from"]["path"])
  assert what.startswith("export")
  shapes = hf_flava.target_shapes(flava.from_dict(config["model"]["flava"]))
  assert {k: v.shape for k, v in flat.items()} == {
      k: tuple(s) for k, s in shapes.items()}


def test_manifest_records_source_and_dropped_extras(files, imported):
  from florax import export  # pylint: disable=g-import-not-at-top
  _, _, manifest = _load_dir(imported[0])
  src = manifest["source"]
  assert (src["source"], src["arch"]) == ("hf", "test")
  assert src["checkpoint_sha256"] == export.sha256_file(files["pretraining"])
  # FlavaForPreTraining's head and codebook: dropped without being asked.
  assert src["allow_missing"] == []
  assert "mlm_head.decoder.weight" in src["dropped"]
  assert sum(n.startswith("image_codebook.") for n in src["dropped"]) == 42
  assert "1 of its pre-training heads" in imported[2]
  assert manifest["model"] == "flava" and manifest["export_platforms"] == []
  pre = manifest["preprocess"]
  assert pre["size"] == 32 and pre["resize_size"] == 32
  assert pre["mean"] == pytest.approx(hf_flava.MEAN)
  for name, info in manifest["files"].items():
    assert info["sha256"] == export.sha256_file(
        os.path.join(imported[0], name))
  assert sorted(manifest["files"]) == ["config.json", "params.safetensors",
                                       "wordpiece.json"]


def test_tokenizer_round_trip(files, imported):
  """The directory's tokenizer (kind 'wordpiece') gives the ids of the
  vocab.txt it came from."""
  from florax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  config, _, manifest = _load_dir(imported[0])
  assert manifest["tokenizer"] == {"kind": "wordpiece",
                                   "file": "wordpiece.json",
                                   "vocab_size": VOCAB}
  path = config["data"]["tokenizer_path"]
  assert path == os.path.join(os.path.abspath(imported[0]), "wordpiece.json")
  assert config["data"]["tokenizer_kind"] == "wordpiece"
  tok = tok_lib.from_file(path)
  src = tok_lib.from_file(str(files["vocab"]))
  assert tok.kind == src.kind == "wordpiece"
  assert tok.encode(TEXT, 16).tolist() == src.encode(TEXT, 16).tolist() == IDS
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4)
  assert tok.decode(IDS) == "a photo of the cats, sitting on a mat."


def test_codebook_import(imported):
  """--codebook_out: FlavaForPreTraining's image codebook as its own
  directory, giving transformers' codebook logits."""
  config, params, manifest = _load_dir(imported[1])
  assert config["model"]["arch"] == "flava_codebook"
  cfg = flava_codebook.CodebookConfig(**config["model"]["flava_codebook"])
  assert manifest["source"]["component"] == "image_codebook"
  assert manifest["tokenizer"] is None and manifest["max_len"] is None
  _, x, outs, _ = ref.load(ref.CODEBOOK_FIXTURE)
  got = jax.jit(flava_codebook.ImageCodebook(cfg).apply)(
      {"params": unflatten_params(params)}, jnp.asarray(x["images"]))
  assert float(np.abs(np.asarray(got) - outs["logits"]).max()) <= ATOL
  # HF's codebook input: pixels in [0, 1] -> 0.8 x + 0.1.
  pre = manifest["preprocess"]
  for p in (0.0, 1.0):
    assert (p - pre["mean"][0]) / pre["std"][0] == pytest.approx(0.8 * p + .1)


def test_mistakes_stop_before_anything_is_written(fixture, files, tmp_path):
  from launch import import_weights  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = fixture[0]
  out = tmp_path / "out"
  nowhere = str(tmp_path / "no_such_checkpoint.safetensors")
  # An unknown arch, a non-export --out, a tokenizer of another size: all
  # refused before the checkpoint (which does not exist) is read.
  with pytest.raises(ValueError, match="unknown Hugging Face FLAVA arch "
                     "'flava-huge'; known: .*full"):
    import_weights.import_hf_flava("flava-huge", nowhere, str(out))
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="is not a florax export"):
    import_weights.import_hf_flava("test", nowhere, str(mine))
  assert (mine / "notes.txt").read_text() == "keep me"
  with pytest.raises(FileExistsError, match="--codebook_out .* is not a "
                     "florax export"):
    import_weights.import_hf_flava("test", nowhere, str(out),
                                   codebook_out=str(mine))
  small = _write_vocab(tmp_path / "vocab.txt", size=50)
  with pytest.raises(ValueError, match="has 50 ids but FLAVA test's text "
                     "embedding has 99 rows"):
    import_weights.import_hf_flava("test", nowhere, str(out),
                                   tokenizer_path=str(small))
  bad_tok = tmp_path / "tokenizer.json"
  bad_tok.write_text('{"model": {"type": "BPE", "vocab": {}}}')
  with pytest.raises(ValueError, match="is not a BERT WordPiece tokenizer"):
    import_weights.import_hf_flava("test", nowhere, str(out),
                                   tokenizer_path=str(bad_tok))
  # A checkpoint missing a tensor: named, nothing written.
  cut = str(tmp_path / "cut.safetensors")
  name = "text_model.encoder.layer.1.output.dense.weight"
  save_file({k: v for k, v in state.items() if k != name}, cut)
  with pytest.raises(ValueError, match=r"does not fit hf arch test \(.*\): 1 "
                     r"florax params missing from the checkpoint \("
                     r"text_encoder/encoder/block1/mlp/fc2/kernel\)"):
    import_weights.import_hf_flava("test", cut, str(out))
  # --codebook_out on a FlavaModel checkpoint (no codebook).
  cb = tmp_path / "cb"
  with pytest.raises(ValueError, match="holds no image codebook"):
    import_weights.import_hf_flava("test", str(files["model"]), str(out),
                                   codebook_out=str(cb))
  assert not out.exists() and not cb.exists()


def test_cli_errors_are_one_line(files, tmp_path):
  res = _run("--source", "hf", "--arch", "flava_huge", "--checkpoint",
             files["model"], "--out", tmp_path / "out")
  assert res.returncode == 2, res.stderr[-3000:]
  lines = res.stderr.strip().splitlines()
  assert lines == ["florax: error: unknown Hugging Face FLAVA arch "
                   "'flava_huge'; known: facebook/flava-full, flava-full, "
                   "full, test, or the path of a FLAVA config.json (or its "
                   "directory)"], lines
  assert not (tmp_path / "out").exists()


def test_registry_knows_hf():
  from florax import convert  # pylint: disable=g-import-not-at-top
  assert convert.module_for("hf", "full") is hf_flava
  assert convert.known_archs("hf") == ["full", "test"]
  assert not hasattr(convert, "NOT_YET")
  with pytest.raises(ValueError, match="unknown weight source 'hub'"):
    convert.module_for("hub", "full")


def test_an_hf_config_json_is_an_arch(fixture, files, tmp_path):
  """--arch may be a FLAVA config.json (or its directory) as transformers
  wrote it: any size imports. The recorded test model's config gives the
  'test' arch and the same params; the full FlavaConfig()'s gives 'full'
  (241,356,289 params); the codebook's own config gives the 'test'
  codebook."""
  from launch import import_weights  # pylint: disable=g-import-not-at-top
  meta = fixture[3]
  (tmp_path / "config.json").write_text(json.dumps(meta["hf_config"]))
  for arch in (str(tmp_path), str(tmp_path / "config.json")):
    assert hf_flava.arch_fields(arch) == hf_flava.arch_fields("test")
  full = tmp_path / "full.json"
  full.write_text(json.dumps(meta["full_size"]["flava_model"]["hf_config"]))
  assert flava.param_count(hf_flava.arch_config(str(full))) == 241_356_289
  cb = tmp_path / "codebook.json"
  cb.write_text(json.dumps(ref.load(ref.CODEBOOK_FIXTURE)[3]["hf_config"]))
  assert hf_flava.codebook_arch_config(str(cb), 16) == (
      hf_flava.codebook_arch_config("test"))
  out = tmp_path / "imported"
  import_weights.import_hf_flava(str(tmp_path), str(files["model"]), str(out))
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  got = load_file(str(out / "params.safetensors"))
  state = fixture[0]
  # The converted params hold the HF tensors (e.g. the patch embedding).
  np.testing.assert_array_equal(
      got["image_encoder/patch_embed/kernel"],
      state["image_model.embeddings.patch_embeddings.projection.weight"]
      .transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match="not a FLAVA config"):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "bert"}))
    hf_flava.arch_fields(str(bad))
