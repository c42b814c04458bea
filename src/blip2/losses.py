"""Stage-1 losses as plain functions of tensors (ITC, ITM hard negatives, ITG), and distributed gathering."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's local batch size (a collective; ``[n]`` when not distributed).

    Ranks may hold different numbers of samples: the collator drops unreadable images, so one corrupt file
    shortens one rank's batch. The gathers below pad to the largest size, so they never exchange tensors of
    different shapes (which gloo answers by aborting the process and NCCL by hanging).
    """
    _, size = world()
    if size == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine)
    return [int(p) for p in parts]


def rank_offset(sizes: list[int]) -> int:
    """Row of this rank's first sample in the gathered (global) batch."""
    rank, _ = world()
    return sum(sizes[:rank])


def _gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather along dim 0 for per-rank row counts ``sizes``: pad to the largest, gather, drop the padding.
    (sum(sizes), ...)"""
    longest = max(sizes)
    padded = x.contiguous()
    if x.shape[0] < longest:
        padded = torch.cat([padded, padded.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (all_reduce, then slice).

    Written out rather than ``torch.distributed.nn.functional.all_gather``: with gloo, that one's backward
    gave wrong gradients for the (B, E) text features in our ITC test (tests/test_stage1.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # noqa: ANN001
        ctx.start, ctx.batch = rank_offset(sizes), x.shape[0]
        return _gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.batch], None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's own rows, summed
    over the ranks that used them. ``sizes``: every rank's row count (`batch_sizes`), gathered if not given."""
    _, size = world()
    if size == 1:
        return x
    return _GatherWithGrad.apply(x, sizes if sizes is not None else batch_sizes(x.shape[0], x.device))


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, outside autograd. On one process ``x`` itself comes
    back (still attached to its graph): ``.detach()`` it where no gradient may flow."""
    _, size = world()
    if size == 1:
        return x
    return _gather_rows(x, sizes if sizes is not None else batch_sizes(x.shape[0], x.device))


@torch.no_grad()
def all_gather_padded(x: torch.Tensor, pad_value: int, sizes: list[int] | None = None) -> torch.Tensor:
    """Gather (B, T) token tensors whose T differs between ranks (each pads to its own longest text): pad
    to the longest T over all ranks first. → (B_global, T_max)"""
    _, size = world()
    if size == 1:
        return x
    width = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    x = F.pad(x, (0, int(width) - x.shape[1]), value=pad_value)
    return all_gather_no_grad(x, sizes)


def itc_similarities(
    image_feats: torch.Tensor,  # (Bi, Q, E), normalised
    text_feats: torch.Tensor,  # (Bt, E), normalised
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text similarity = max over the queries of (query feature · text [CLS] feature).

    Returns (sim_i2t (Bi, Bt), sim_t2i (Bt, Bi)); both are the same max-over-queries matrix.
    """
    sim_q2t = torch.einsum("iqe,te->itq", image_feats, text_feats)  # (Bi, Bt, Q)
    sim_i2t = sim_q2t.max(dim=-1).values  # (Bi, Bt)
    return sim_i2t, sim_i2t.t()


def itc_loss(
    image_feats: torch.Tensor,  # (B, Q, E) this rank's, normalised
    text_feats: torch.Tensor,  # (B, E) this rank's, normalised
    temp: torch.Tensor,  # scalar
    label_smoothing: float = 0.1,
    sizes: list[int] | None = None,
    gather_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric contrastive loss of this rank's samples against the global batch.

    Which tower each term trains (``gather_grad``):

    - ``False`` (the authors' code, LAVIS ``concat_all_gather``): the *other* side's features are gathered
      without gradient, this rank's own rows included, so the image->text term trains only the image side
      and the text->image term only the text side (both train ``temp``). LAVIS always runs distributed, so
      this holds on one GPU too; here it holds on one process as well.
    - ``True``: gathered with gradient (`all_gather_with_grad`), so both terms reach both towers.

    The paper does not say which; the default follows the released code. ``sizes``: every rank's batch size
    (`batch_sizes`; gathered here if not given).
    Returns (loss, sim_i2t (B, B_global), sim_t2i (B, B_global)), the similarities already divided by
    the temperature (ITM samples its hard negatives from them).
    """
    b = image_feats.shape[0]
    sizes = sizes if sizes is not None else batch_sizes(b, image_feats.device)
    start = rank_offset(sizes)
    if gather_grad:
        image_all = all_gather_with_grad(image_feats, sizes)  # (Bg, Q, E)
        text_all = all_gather_with_grad(text_feats, sizes)  # (Bg, E)
    else:
        image_all = all_gather_no_grad(image_feats, sizes).detach()  # (Bg, Q, E)
        text_all = all_gather_no_grad(text_feats, sizes).detach()  # (Bg, E)
    sim_i2t = itc_similarities(image_feats, text_all)[0] / temp  # (B, Bg)
    sim_t2i = itc_similarities(image_all, text_feats)[1] / temp  # (B, Bg)
    targets = torch.arange(start, start + b, device=image_feats.device)
    loss = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    ) / 2
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor,  # (B, Bg): row b scores candidates; the positive of row b is column offset + b
    offset: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One negative index per row, drawn in proportion to softmax(sim) with the positive excluded. → (B,)"""
    b, n = sim.shape
    if n < 2:
        raise ValueError("hard-negative mining needs at least 2 candidates in the (global) batch")
    weights = torch.softmax(sim.float(), dim=1)
    rows = torch.arange(b, device=sim.device)
    weights[rows, offset + rows] = 0.0
    weights = torch.nan_to_num(weights, nan=0.0)
    # a row whose every negative underflowed to 0 falls back to uniform over the negatives
    empty = weights.sum(dim=1) <= 0
    if bool(empty.any()):
        weights[empty] = 1.0
        weights[empty.nonzero().squeeze(1), offset + rows[empty]] = 0.0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(itm_logits: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Binary matching loss; logits (3B, 2) ordered [positives | neg image, text | image, neg text]."""
    labels = torch.cat([torch.ones(batch_size, dtype=torch.long), torch.zeros(2 * batch_size, dtype=torch.long)]).to(
        itm_logits.device
    )
    return F.cross_entropy(itm_logits, labels)


def lm_loss(
    logits: torch.Tensor,  # (B, T, V): position t predicts labels[:, t + 1]
    labels: torch.Tensor,  # (B, T), -100 ignored
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """Shifted next-token cross-entropy (ITG uses label smoothing 0.1, as the reference does)."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    shifted = shifted.to(torch.promote_types(shifted.dtype, torch.float32))  # at least float32 (bf16 logits)
    return F.cross_entropy(shifted, targets, ignore_index=-100, label_smoothing=label_smoothing)
