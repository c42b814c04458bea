"""Evaluation (an application above the library): how well a model retrieves, captions and answers.

- `retrieval`: recall@K of image↔text rankings; `captions`: COCO caption metrics (BLEU, CIDEr, METEOR, SPICE);
  `vqa`: question cleaning, answer normalisation, VQA accuracy; `scenes`: attribute accuracy on the synthetic
  scenes (imported only when scenes are evaluated) -- pure functions of predictions and references.
- `loaders`: COCO caption / VQA files, checked record by record; `protocol`: the authors' settings per LLM
  family; `runner`: runs models over a dataset (`run_eval`, and `evaluate_from_paths` for ``blip2 eval``).
"""
