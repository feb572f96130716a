"""Model-agnostic evaluators that work on embeddings and frozen features.

- `zeroshot`: prompt-ensembled class embeddings, streaming top-k accuracy.
- `retrieval`: image<->text recall@k with several captions per image.
- `linear_probe`: L2-regularised logistic regression with an l2 sweep.
- `few_shot`: N-way K-shot episodes with a linear head, mean and 95% CI.

All share one tie rule, pessimistic: a right answer tied with wrong ones is
ranked after all of them, so ties can never raise a metric.
"""
