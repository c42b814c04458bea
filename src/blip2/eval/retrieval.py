"""Retrieval metrics: recall@K of image→text and text→image rankings, and the re-ranked score matrix.

Pure functions of score matrices and ground truth; `blip2.eval.runner.eval_retrieval` runs a model and
calls them. Scores are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _wrong_candidates_at_least_as_good(scores: Tensor, positive: Tensor, row_chunk: int) -> Tensor:
    """For each row, how many non-positive columns score >= the row's best positive.

    That count is the 0-based rank of the best correct candidate, with ties resolved against the model (a
    constant score matrix gets no credit). `positive` is a bool mask of the same shape as `scores`.
    """
    ranks = []
    for start in range(0, scores.shape[0], row_chunk):
        s, pos = scores[start : start + row_chunk], positive[start : start + row_chunk]
        best = s.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)  # (b, 1)
        ranks.append(((s >= best) & ~pos).sum(dim=1))
    return torch.cat(ranks)


def retrieval_recall(
    sim_i2t: Tensor,
    img_to_txt: Sequence[Sequence[int]],
    txt_to_img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    sim_t2i: Tensor | None = None,
    row_chunk: int = 1024,
) -> dict[str, float]:
    """Image→text and text→image recall@K from final score matrices.

    sim_i2t: (N_img, N_txt) scores used to rank texts for each image. sim_t2i: (N_txt, N_img) scores used
    to rank images for each text; defaults to `sim_i2t.T`. Pass both when scores were re-ranked per
    direction (BLIP-2 re-scores each query's ITC top-k with ITM; see `merge_reranked`).
    An image query is a hit at K if any of its ground-truth texts `img_to_txt[i]` ranks in the top K;
    a text query if its image `txt_to_img[t]` does. Returns `i2t_r{k}`, `t2i_r{k}`, their means
    `i2t_r_mean`/`t2i_r_mean`, and the overall `r_mean` (fractions, not percent).
    """
    n_img, n_txt = sim_i2t.shape
    if len(img_to_txt) != n_img or len(txt_to_img) != n_txt:
        raise ValueError(
            f"sim_i2t is {n_img}x{n_txt} but got {len(img_to_txt)} img_to_txt entries and "
            f"{len(txt_to_img)} txt_to_img entries; they must match the matrix's rows and columns"
        )
    if sim_t2i is None:
        sim_t2i = sim_i2t.T
    elif sim_t2i.shape != (n_txt, n_img):
        raise ValueError(f"sim_t2i must be ({n_txt}, {n_img}) to match sim_i2t, got {tuple(sim_t2i.shape)}")
    if any(len(texts) == 0 for texts in img_to_txt):
        raise ValueError("every image needs at least one ground-truth text in img_to_txt")

    i2t_positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    rows = torch.tensor([i for i, texts in enumerate(img_to_txt) for _ in texts], dtype=torch.long)
    cols = torch.tensor([t for texts in img_to_txt for t in texts], dtype=torch.long)
    i2t_positive[rows, cols] = True
    t2i_positive = torch.zeros(n_txt, n_img, dtype=torch.bool)
    t2i_positive[torch.arange(n_txt), torch.as_tensor(list(txt_to_img), dtype=torch.long)] = True

    i2t_rank = _wrong_candidates_at_least_as_good(sim_i2t.float(), i2t_positive, row_chunk)  # (N_img,)
    t2i_rank = _wrong_candidates_at_least_as_good(sim_t2i.float(), t2i_positive, row_chunk)  # (N_txt,)
    result: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            result[f"{direction}_r{k}"] = (ranks < k).float().mean().item()
        result[f"{direction}_r_mean"] = sum(result[f"{direction}_r{k}"] for k in ks) / len(ks)
    result["r_mean"] = (result["i2t_r_mean"] + result["t2i_r_mean"]) / 2
    return result


def merge_reranked(base_scores: Tensor, topk_indices: Tensor, topk_scores: Tensor, fill: float = -100.0) -> Tensor:
    """A score matrix holding `topk_scores` at the re-ranked candidates and `fill` everywhere else.

    base_scores: (N_query, N_candidate), only its shape and dtype are used; topk_indices/topk_scores:
    (N_query, k). This is how the reference builds its final matrix after ITM re-ranking the ITC top-k, so
    a candidate outside a query's top-k always ranks below every re-ranked one.
    """
    merged = torch.full_like(base_scores, fill)
    return merged.scatter(1, topk_indices, topk_scores.to(base_scores.dtype))
