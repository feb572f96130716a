"""Analytic step FLOPs of FLAVA pre-training (florax.tasks.flava,
`FlavaTask.step_flops`) against the programs they describe, one per batch
kind (image: MIM; text: MLM; pair: contrastive + ITM + MMM).

As in tests/test_flops_beit3.py, the reference is the op-by-op count of
every dot_general and convolution of the lowered, unrolled (no scan, no
remat) train step of each kind (`flops.hlo_matmul_flops` over
task.value_and_grad): the closed forms never see that program, so an
encoder pass, a projection, a head, the contrastive logits or the frozen
tokenizer's work they miss or double-count shows up as a difference. The
counts agree exactly.

The tiny preset (64 wide, two layers per encoder, 32 px, patch 8: a 4x4
grid); the frozen VQ-KD tokenizer is test_flops_beit3's config-only run
(16 px, patch 4: the same 4x4 grid at half the resolution, so the resize
of the pixels is part of the count); no weights are needed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import flava as flava_configs
from florax import restore
from florax.models import flops
from florax.tasks import base
from florax.tasks import flava
from florax.tasks import vq_tokenizer
from test_flops_beit3 import _abstract, _cost, _mesh_rules
from test_flops_beit3 import _tokenizer_workdir

BATCH = 4


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("flava")
  cfg = flava_configs.get_config("tiny")
  with cfg.unlocked():
    cfg.tokenizer.path = _tokenizer_workdir(tmp / "vqkd")
    for kind in flava.KINDS:
      cfg.data.batch_sizes[kind] = BATCH
  fc = cfg.model.flava
  for tower in (fc.image, fc.text, fc.multimodal):
    assert tower.remat == "none" and not tower.scan and tower.depth == 2
  t = flava.FlavaTask(cfg, str(tmp / "work"), *_mesh_rules(cfg))
  # The frozen tokenizer reads its config only: stand in for the
  # checkpoint its constructor looks for.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(restore, "available_steps", lambda path: [0])
    tok = t.visual_tokenizer
  assert isinstance(tok, vq_tokenizer.FrozenVQTokenizer)
  assert (tok.grid, tok.image_size, tok.num_codes) == (4, 16, 32)
  t.validate()
  return t


def _lower(task, kind):
  """task.value_and_grad of one abstract global batch of `kind` (the train
  step's FLOP content: the optimizer update is elementwise), lowered."""
  params = _abstract(nn.unbox(jax.eval_shape(task.init, jax.random.key(0))))
  frozen = _abstract(nn.unbox(task.frozen_spec()))
  batch = _abstract(task.batch_kinds()[kind])

  def step(p, b, f):
    ctx = base.StepContext(step=jnp.int32(0), frozen=f, kind=kind)
    return task.value_and_grad(p, b, jax.random.key(1), ctx)
  return jax.jit(step).lower(params, batch, frozen)


def _by_hand(task, kind):
  """The step's FLOPs written out from the model's shapes."""
  fc, length = task.flava_config, task.config.data.max_len
  n, codes, vocab = 16, 32, fc.text.vocab_size
  w = 64  # every encoder's width, and embed_dim
  patch = 2.0 * n * (8 * 8 * 3) * w  # one 8x8 patch per token
  image = patch + flops.encoder_forward(fc.image.encoder(), 1 + n)
  text = flops.encoder_forward(fc.text.encoder(), length)

  def head(tokens, out):
    return 2.0 * tokens * w * (w + out)
  vq = task.visual_tokenizer.model_config
  tokenizer = flops.vq_codes_forward(vq) + flops.resize_flops(32, 16)
  if kind == "image":
    return BATCH * (3 * (image + head(n, codes)) - patch + tokenizer)
  if kind == "text":
    return BATCH * 3 * (text + head(length, vocab))
  mm = (2.0 * (1 + n + length) * w * w           # the to-mm projections
        + flops.encoder_forward(fc.multimodal.encoder(), 2 + n + length))
  per_pair = (2 * (image + text) + 2 * (2.0 * w * w)  # contrastive projs
              + mm + 2.0 * w * w + 2.0 * w * 2        # pooler, ITM
              + head(n, codes) + head(length, vocab))
  logits = 2.0 * BATCH * BATCH * w
  return (3 * (BATCH * per_pair + logits) - 2 * BATCH * patch
          + BATCH * tokenizer)


@pytest.mark.parametrize("kind", flava.KINDS)
def test_step_flops_equal_the_programs_matmuls(task, kind):
  analytic = task.step_flops(kind, BATCH)
  assert analytic == pytest.approx(_by_hand(task, kind), rel=1e-12)
  lowered = _lower(task, kind)
  counted = flops.hlo_matmul_flops(lowered)
  assert analytic == pytest.approx(counted, rel=1e-9), (analytic, counted)
  # XLA's own total adds the elementwise work (norms, softmax, the loss).
  aggregate = _cost(lowered)
  assert aggregate >= analytic, (aggregate, analytic)
  print(f"\nflava {kind}: analytic {analytic:.6g}, HLO dots/convs "
        f"{counted:.6g} ({analytic / counted - 1:+.1e}), XLA aggregate "
        f"{aggregate:.6g} ({aggregate / analytic:.3f}x analytic)")


def test_flops_are_unknown_with_a_stand_in_tokenizer_or_kind(task):
  assert task.step_flops("caption", BATCH) is None

  class StandIn:
    num_codes, image_size, grid = 32, 16, 4
  other = flava.FlavaTask(task.config, task.workdir, task.mesh, task.rules)
  other._vq = StandIn()  # pylint: disable=protected-access
  assert all(other.step_flops(k, BATCH) is None for k in flava.KINDS)
  assert other.flops_per_example() is None  # per kind: step_flops only
