"""torchrun script: ITC loss gradients with features gathered across 2 gloo ranks.

Each rank takes its part of a fixed global batch of 8, computes the ITC loss against the gathered features,
backpropagates and averages gradients over ranks (what DDP does); rank 0 saves them. Two splits: even (4 + 4)
and uneven (3 + 5, as when one rank's collator dropped unreadable images); for the uneven one each rank
weights its mean loss by its share of the global batch, so both must equal the 1-process gradients. Both
gather modes: without gradient (``nograd``, the authors' code) and with it (``grad``).
Then a full stage-1 step (ITC + ITM hard negatives + ITG) on the uneven split must run and give finite losses.
usage: torchrun --nproc_per_node 2 helpers_ddp_itc.py OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from blip2 import losses
from blip2.testing import make_tiny_model


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, 32, 32, generator=g)
    ids = torch.randint(5, 90, (8, 6), generator=g)
    ids[:, 0] = 1
    out: dict[str, dict[str, torch.Tensor]] = {}
    splits = {"even": (0, 4, 8), "uneven": (0, 3, 8)}
    for (split, bounds), gather_grad in [(item, mode) for item in splits.items() for mode in (False, True)]:
        model = make_tiny_model(None, llm=None, seed=0).eval()  # no dropout: the comparison is exact
        part = slice(bounds[rank], bounds[rank + 1])
        share = (part.stop - part.start) * world / 8
        feats, _, _ = model.image_embeddings(model.encode_image(pixels[part]))
        text = model.text_embeddings(ids[part], torch.ones_like(ids[part]))
        loss, _, _ = losses.itc_loss(feats, text, model.temp, gather_grad=gather_grad)
        (loss * share).backward()
        grads = {}
        for name, p in model.named_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                grads[name] = p.grad / world
        out[f"{split}-{'grad' if gather_grad else 'nograd'}"] = grads

    model = make_tiny_model(None, llm=None, seed=0).train()
    part = slice((0, 3, 8)[rank], (0, 3, 8)[rank + 1])
    lengths = torch.tensor([6, 4, 5, 6, 3, 6, 2, 5])[part]  # ranks pad to different widths
    mask = (torch.arange(6)[None] < lengths[:, None]).long()[:, : int(lengths.max())]
    step = model(
        input_ids=ids[part, : mask.shape[1]] * mask,
        attention_mask=mask,
        pixel_values=pixels[part],
        generator=torch.Generator().manual_seed(rank),
    )
    step.loss.backward()
    assert all(torch.isfinite(v) for v in step.losses.values()), step.losses
    if rank == 0:
        torch.save(out, sys.argv[1])
    # Both ranks leave together: a rank tearing gloo down while its peer still works got SIGABRT (~1 run in 6).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
