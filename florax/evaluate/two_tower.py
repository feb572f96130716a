"""The evaluators of an image-text two-tower task, configured by
`config.evals` (big_vision's pattern): one entry per evaluator,

  config.evals.<name> = {type: 'zeroshot' | 'retrieval' | 'linear_probe'
                         | 'few_shot', enabled: bool,
                         every: steps (0: every evaluation),
                         data: {...see eval_sets.py}, ...type fields}

logged as eval/<name>_<metric> (e.g. eval/zeroshot_top1). They run during
training and from `launch.evaluate`, on digits or the user's data alike.
Every metric uses the suite's pessimistic tie rule: a right answer tied
with a wrong one ranks last.
"""

from __future__ import annotations

import json

import numpy as np

from florax.data import prompts
from florax.evaluate import eval_sets, few_shot, linear_probe, retrieval
from florax.evaluate import zeroshot

TYPES = ("zeroshot", "retrieval", "linear_probe", "few_shot")


def check(evals) -> None:
  """Raises ValueError naming a misconfigured evaluator (before compiling)."""
  for name, ev in (evals or {}).items():
    if not ev.get("enabled", True):
      continue
    kind = ev.get("type", name)
    if kind not in TYPES:
      raise ValueError(f"config.evals.{name}.type={kind!r} is not one of "
                       f"{TYPES}")
    source = ev.get("data", {}).get("source", "digits")
    if source not in ("digits", "records", "tfds"):
      raise ValueError(f"config.evals.{name}.data.source={source!r}: use "
                       "'digits', 'records' or 'tfds'")
    if source == "records" and not ev.data.get("path"):
      raise ValueError(f"config.evals.{name}.data.path is empty: name the "
                       "records directory to evaluate on")
    every = ev.get("every", 0)
    if not isinstance(every, int) or every < 0:
      raise ValueError(f"config.evals.{name}.every must be an integer >= 0, "
                       f"got {every!r}")


class Evaluators:
  """Runs `config.evals` for a two-tower task.

  Args:
    task: gives `image_embedder()`, `text_embedder()`, `feature_extractor()`
      (MeshMaps over params, inputs -> outputs), `encode_texts(params,
      texts)`, `preprocess_spec()` and its config.
  """

  def __init__(self, task):
    self.task = task
    self.evals = task.config.get("evals") or {}
    self._sets: dict[str, eval_sets.EvalSet] = {}

  def eval_set(self, data_cfg) -> eval_sets.EvalSet:
    key = json.dumps(data_cfg.to_dict() if hasattr(data_cfg, "to_dict")
                     else dict(data_cfg), sort_keys=True, default=str)
    if key not in self._sets:
      self._sets[key] = eval_sets.load(data_cfg, self.task.preprocess_spec())
    return self._sets[key]

  def run(self, params, step: int | None = None) -> dict[str, float]:
    """Every evaluator due at `step` (all of them when step is None)."""
    metrics: dict[str, float] = {}
    for name, ev in self.evals.items():
      if not ev.get("enabled", True):
        continue
      every = ev.get("every", 0)
      if step is not None and every and step % every:
        continue
      kind = ev.get("type", name)
      out = getattr(self, f"_{kind}")(params, ev)
      metrics.update({f"eval/{name}_{k}": v for k, v in out.items()})
    return metrics

  # -- evaluators -------------------------------------------------------------

  def _prompts(self, ev, data: eval_sets.EvalSet) -> list[list[str]]:
    """Per class, the prompts ensembled into its embedding.

    templates: 'dataset' (the split's own per-class prompts, e.g. digits'),
    'training' (the templates training wraps class names in), 'imagenet'
    (CLIP's 80), or a list of "{}" templates.
    """
    kind = ev.get("templates", "training")
    if data.class_names is None:
      raise ValueError(
          "zero-shot evaluation needs class names: the split has none; give "
          "data.names_file (one name per line, in label order)")
    if kind == "dataset":
      if data.class_prompts is None:
        raise ValueError("templates='dataset': this split has no prompts of "
                         "its own; use 'training' or 'imagenet'")
      return data.class_prompts
    templates = self.templates(ev)
    return [[t.format(name) for t in templates] for name in data.class_names]

  @staticmethod
  def templates(ev) -> list[str] | None:
    """The "{}" templates of a zero-shot evaluator (None for 'dataset': the
    split's own prompts). Exports record these, so that inference's
    zero-shot ensembles the very prompts the logged evaluation did."""
    kind = ev.get("templates", "training")
    if kind == "dataset":
      return None
    templates = {"training": prompts.FLORENCE_TEMPLATES,
                 "imagenet": zeroshot.IMAGENET_TEMPLATES}.get(kind, kind)
    if isinstance(templates, str):
      raise ValueError(f"templates={kind!r}: use 'dataset', 'training', "
                       "'imagenet' or a list of templates with '{}'")
    return list(templates)

  def class_embeddings(self, params, class_prompts) -> np.ndarray:
    """Prompt-ensembled class embeddings (classes, d), unit norm."""
    encode = lambda texts: self.task.encode_texts(params, texts)
    # Each class has its own full prompts (no shared "{}" template), so each
    # is ensembled as one class whose templates are its prompts.
    return np.concatenate([
        zeroshot.class_embeddings(
            encode, [""], [p.replace("{", "{{").replace("}", "}}") + "{}"
                           for p in class_prompts_c])
        for class_prompts_c in class_prompts])

  def _zeroshot(self, params, ev):
    data = self.eval_set(ev.data)
    if data.labels is None:
      raise ValueError("zero-shot evaluation needs labelled images; this "
                       "split has none")
    ks = tuple(ev.get("ks", (1, 5)))
    acc = zeroshot.TopKAccuracy(
        self.class_embeddings(params, self._prompts(ev, data)),
        ks=tuple(k for k in ks if k <= len(data.class_names)) or (1,))
    acc.update(self.task.image_embedder()(params, data.images), data.labels)
    return acc.result()

  def _retrieval(self, params, ev):
    data = self.eval_set(ev.data)
    if not data.texts:
      raise ValueError("retrieval needs captions; the split has none")
    image_emb = self.task.image_embedder()(params, data.images)
    text_emb = self.task.encode_texts(params, data.texts)
    return retrieval.recall_at_k(image_emb, text_emb, data.text_image,
                                 ks=tuple(ev.get("ks", (1, 5, 10))))

  def _features(self, params, images):
    return self.task.feature_extractor()(params, images)

  def _linear_probe(self, params, ev):
    test = self.eval_set(ev.data)
    train = self.eval_set(ev.train_data)
    if test.labels is None or train.labels is None:
      raise ValueError("the linear probe needs labelled train and test splits")
    order = np.random.default_rng(self.task.config.seed).permutation(
        len(train.images))
    x = self._features(params, train.images[order])
    y = train.labels[order]
    n_val = max(1, len(order) // 5)
    probe = linear_probe.fit_and_score(
        x[n_val:], y[n_val:], x[:n_val], y[:n_val],
        self._features(params, test.images), test.labels,
        num_classes=int(max(y.max(), test.labels.max())) + 1)
    return {"top1": probe["test_acc"], "l2": probe["l2"]}

  def _few_shot(self, params, ev):
    data = self.eval_set(ev.data)
    feats = self._features(params, data.images)
    out = {}
    for k in ev.get("shots", (5,)):
      result = few_shot.evaluate(
          feats, data.labels, n_way=ev.get("ways", 5), k_shot=int(k),
          n_query=ev.get("queries", 15), episodes=ev.get("episodes", 100),
          seed=self.task.config.seed)
      out[f"{ev.get('ways', 5)}way_{k}shot"] = result["acc"]
      out[f"{ev.get('ways', 5)}way_{k}shot_ci95"] = result["ci95"]
    return out
