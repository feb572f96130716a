"""Small configs shared by the tests (kept tiny: the suite runs on 2 cores)."""

from configs import florence


def tiny_config(**overrides):
  """The tiny Florence preset shrunk further: 16 px images, small batch."""
  cfg = florence.get_config("tiny")
  with cfg.unlocked():
    cfg.data.image_size = 16
    cfg.train.batch_size = 16
    cfg.train.steps = 6
    cfg.train.log_every = 1
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 2
    cfg.optimizer.warmup_steps = 2
    cfg.model.image.drop_path_rate = 0.1  # exercise the dropout rng on resume
    apply_overrides(cfg, overrides)
  return cfg


def apply_overrides(cfg, overrides):
  """Sets {'a.b.c': value} fields, as --config.a.b.c=value would."""
  for dotted, value in overrides.items():
    node = cfg
    *path, last = dotted.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return cfg
