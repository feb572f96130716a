"""ZeRO stages 0-3 on 8 emulated devices.

1. Per-device bytes of params + gradients + optimizer state of Florence-B
   (212M parameters, shapes only) under each stage are within 5% of the
   ZeRO paper's 16Ψ, 8Ψ+8Ψ/N, 4Ψ+12Ψ/N, 16Ψ/N.
2. Three training steps under every stage and mesh shape give the
   loss and parameters of a plain single-device loop (jax.grad + optax, no
   mesh, no sharding) to 1e-5.
3. Shapes that no single dimension lets 8 devices split are cut as far as
   a naive search over all divisors says they can be (a real tiling), and
   a stage-3 MLP of such widths trains like the unsharded loop and its
   checkpoint restores into other stages and meshes.
"""

import collections
import itertools
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import florence
from florax.models import two_tower
from florax import tasks
from florax.parallel import mesh as mesh_lib
from florax.parallel import sharding as sharding_lib
from florax.parallel import zero
from florax.train import checkpoint as ckpt_lib
from florax.train import optimizer as opt_lib
from florax.train import trainer as trainer_lib
import scale_tasks


def test_state_bytes_per_stage_match_the_zero_paper():
  cfg = florence.get_config("b")
  model = two_tower.from_config(cfg.model)
  s, length = cfg.data.image_size, cfg.data.max_len
  boxed = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, s, s, 3)),
                           jnp.zeros((1, length), jnp.int32)),
      jax.random.key(0))["params"]
  abstract = nn.unbox(boxed)
  psi = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  assert psi > 150e6  # a base-size model, not a toy
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  n = 8
  rules = sharding_lib.rules_from_config(cfg.sharding.rules)
  logical = nn.unbox(sharding_lib.logical_shardings(boxed, mesh, rules))
  tx, _ = opt_lib.build_optimizer(cfg.optimizer, 100, abstract)
  abstract_opt = jax.eval_shape(tx.init, abstract)
  ideal = {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n,
           3: 16 * psi / n}
  for stage in zero.STAGES:
    layout = zero.state_layout(boxed, logical, tx, mesh, stage)
    measured = (zero.bytes_per_device(abstract, layout.params)
                + zero.bytes_per_device(abstract, layout.grads)
                + zero.bytes_per_device(abstract_opt, layout.opt_state))
    assert abs(measured / ideal[stage] - 1) <= 0.05, (stage, measured,
                                                      ideal[stage])
  # Stage 3 really shards every big matrix 8 ways (not only on average).
  layout = zero.state_layout(boxed, logical, tx, mesh, 3)
  for a, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(layout.params)):
    if a.size >= 1 << 20:
      assert np.prod(sh.shard_shape(a.shape)) * 8 == a.size


def _reference(cfg, batches, tmp):
  """The steps without mesh or sharding: value_and_grad + optax on device 0
  (jitted on one device: eager dispatch would compile every op)."""
  t = trainer_lib.Trainer(tasks.build(cfg, str(tmp)))
  task = t.task

  @jax.jit
  def step(params, opt, b, rng):
    (loss, _), g = jax.value_and_grad(task.loss, has_aux=True)(params, b, rng)
    updates, opt = tx.update(g, opt, params)
    return loss, optax.apply_updates(params, updates), opt

  with jax.default_device(jax.devices()[0]):
    params = nn.unbox(jax.jit(task.init)(t.init_rng))
    tx, _ = opt_lib.build_optimizer(cfg.optimizer, cfg.train.steps, params)
    opt = tx.init(params)
    key = jax.random.wrap_key_data(jnp.asarray(t.train_rng_data))
    losses = []
    for i, b in enumerate(batches):
      loss, params, opt = step(params, opt, b, jax.random.fold_in(key, i))
      losses.append(float(loss))
  return losses, jax.device_get(params)


# (mesh axes, zero stage): every stage once and every mesh shape once:
# 8x1 (data), 4x2 (data x fsdp), 2x4 (data x tensor: tensor-parallel rules
# on mlp/vocab) and 1x8 (fsdp).
CASES = [({"data": 8, "fsdp": 1, "tensor": 1}, 0),
         ({"data": 4, "fsdp": 2, "tensor": 1}, 1),
         ({"data": 2, "fsdp": 1, "tensor": 4}, 2),
         ({"data": 1, "fsdp": 8, "tensor": 1}, 3)]


def test_stages_and_meshes_match_an_unsharded_loop(tmp_path):
  # A 2-layer MLP whose kernels carry embed/mlp/vocab names: compiling the
  # Florence step 8 times would not fit the suite's time budget.
  cfg = scale_tasks.regression_config(**{"optimizer.clip_norm": 1.0})
  t = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "data")))
  it = t.task.train_iterator(cfg.train.batch_size, 0, 1)
  batches = [next(it) for _ in range(3)]
  ref_losses, ref_params = _reference(cfg, batches, tmp_path / "ref")
  assert len(set(ref_losses)) == 3  # the steps did something
  for i, (axes, stage) in enumerate(CASES):
    c = scale_tasks.regression_config(**{"optimizer.clip_norm": 1.0,
                                         "sharding.zero_stage": stage,
                                         "mesh.axes": axes})
    losses, params, t = scale_tasks.run_steps(c, tmp_path / f"run{i}", batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5,
                               err_msg=f"{axes} stage {stage}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6, err_msg=f"{axes} stage {stage}"),
                 params, ref_params)
    # The layout is real: from stage 1 the Adam moments of the big kernel
    # are split over all 8 devices; from stage 3 the kernel itself.
    kernel = t.layout.params["fc1"]["kernel"]
    mu = t.layout.opt_state[1][0].mu["fc1"]["kernel"]
    shape = (cfg.model.dim, cfg.model.hidden)
    assert np.prod(mu.shard_shape(shape)) * (8 if stage else 1) == np.prod(
        shape)
    assert (np.prod(kernel.shard_shape(shape)) * 8 == np.prod(shape)) == (
        stage == 3)


def _most_shards(shape, n, skip=()):
  """The most ways any split of n devices' worth of factors can cut `shape`:
  a naive search over every divisor of n per dimension (independent of
  zero.py's prime-by-prime placement)."""
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  best = 1
  for parts in itertools.product(divisors, repeat=len(shape)):
    total = int(np.prod(parts))
    if n % total == 0 and all(
        size % p == 0 and (p == 1 or d not in skip)
        for d, (size, p) in enumerate(zip(shape, parts))):
      best = max(best, total)
  return best


@pytest.mark.parametrize("axes", [{"data": 8, "fsdp": 1, "tensor": 1},
                                  {"data": 4, "fsdp": 2, "tensor": 1},
                                  {"data": 2, "fsdp": 4, "tensor": 1}])
@pytest.mark.parametrize("shape,names", [
    ((12, 20), None), ((20,), None), ((3,), None), ((6, 6, 10), None),
    ((16, 6), ("layers", None)), ((24, 40), None), ((7, 7, 3, 44), None)])
def test_awkward_shapes_are_split_as_far_as_they_divide(axes, shape, names):
  mesh = mesh_lib.make_mesh(axes)
  sharding = zero.shard_over_data(shape, P(), mesh, names)
  skip = {d for d, n in enumerate(names or ()) if n == "layers"}
  want = _most_shards(shape, 8, skip)
  assert np.prod(shape) // np.prod(sharding.shard_shape(shape)) == want
  # A real tiling: `want` distinct blocks covering the array once, each on
  # 8 / want devices, and the `layers` dimension never cut.
  blocks = collections.Counter(
      tuple((s.start or 0, s.stop) for s in idx)
      for idx in sharding.devices_indices_map(shape).values())
  assert len(blocks) == want and set(blocks.values()) == {8 // want}
  cover = np.zeros(shape, int)
  for block in blocks:
    cover[tuple(slice(a, b) for a, b in block)] += 1
  assert (cover == 1).all()
  for d in skip:
    assert sharding.shard_shape(shape)[d] == shape[d]


def test_whole_axes_keep_the_mesh_and_a_split_uses_a_view():
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  # Both axes fit one dimension: the original rule, on the mesh itself.
  s = zero.shard_over_data((16, 24), P(), mesh)
  assert s.mesh == mesh and s.spec == P(None, ("data", "fsdp"))
  # Only on two dimensions: one whole axis each, still the mesh itself.
  s = zero.shard_over_data((12, 20), P(), mesh)
  assert s.mesh == mesh and sorted(s.spec) == ["data", "fsdp"]
  # data=8 alone on (12, 20): data is cut into factors on a view of the
  # same device grid (device order kept).
  mesh8 = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  s = zero.shard_over_data((12, 20), P(), mesh8)
  assert s.mesh != mesh8 and list(s.mesh.devices.flat) == list(
      mesh8.devices.flat)
  # Already tensor-split dimensions count what the tensor axis took.
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
  s = zero.shard_over_data((6, 8), P(None, "tensor"), mesh)
  assert np.prod(s.shard_shape((6, 8))) == 48 // 8


# An MLP 12 -> 20 -> 12: no dimension of any kernel is divisible by 8, so
# on data=8 stage 3 cuts data into factors over both dimensions of each
# kernel (a view of the mesh; whole axes on two dimensions, as on data=4 x
# fsdp=2, are plain NamedShardings checked above).
AWKWARD = {"model.dim": 12, "model.hidden": 20, "model.out": 12}


def test_awkward_width_stage3_matches_an_unsharded_loop(tmp_path):
  cfg = scale_tasks.regression_config(**AWKWARD)
  t = trainer_lib.Trainer(tasks.build(cfg, str(tmp_path / "data")))
  it = t.task.train_iterator(cfg.train.batch_size, 0, 1)
  batches = [next(it) for _ in range(2)]
  ref_losses, ref_params = _reference(cfg, batches, tmp_path / "ref")
  assert len(set(ref_losses)) == 2
  c = scale_tasks.regression_config(**AWKWARD, **{"sharding.zero_stage": 3})
  t = trainer_lib.Trainer(tasks.build(c, str(tmp_path / "run")))
  for name, shape in [("fc1", (12, 20)), ("fc2", (20, 12))]:
    kernel = t.layout.params[name]["kernel"]
    assert np.prod(kernel.shard_shape(shape)) * 8 == np.prod(shape)
    assert kernel.mesh != t.mesh  # the view
  state, step, losses = t.init_state(), t.compile_step(), []
  for b in batches:
    state, metrics = step(state, t.global_batch(b), {})
    losses.append(float(metrics["train/loss"]))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  params = jax.device_get(state["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params, ref_params)
  # Its checkpoint (shardings on the view) restores into another stage and
  # mesh: stage 0 with tensor=4 x data=2.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "run"), 1, 1, data_names=())
  ckpt.save(2, state, {}, force=True)
  ckpt.wait()
  c = scale_tasks.regression_config(**AWKWARD, **{
      "mesh.axes": {"data": 2, "fsdp": 1, "tensor": 4}})
  t0 = trainer_lib.Trainer(tasks.build(c, str(tmp_path / "to0")))
  restored = ckpt.restore(2, t0.abstract_state)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(restored["params"]), params)
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(restored["opt_state"]),
               jax.device_get(state["opt_state"]))
  assert restored["params"]["fc1"]["kernel"].sharding == (
      t0.layout.params["fc1"]["kernel"])
