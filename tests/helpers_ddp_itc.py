"""torchrun script: ITC loss gradients with features gathered across 2 gloo ranks (with gradient).

Each rank takes its half of a fixed global batch, computes the ITC loss against the gathered features,
backpropagates and averages gradients over ranks (what DDP does); rank 0 saves them.
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
    model = make_tiny_model(None, llm=None, seed=0).eval()  # no dropout: the comparison is exact
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, 32, 32, generator=g)
    ids = torch.randint(5, 90, (8, 6), generator=g)
    ids[:, 0] = 1
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    feats, _, _ = model.image_embeddings(model.encode_image(pixels[part]))
    text = model.text_embeddings(ids[part], torch.ones_like(ids[part]))
    loss, _, _ = losses.itc_loss(feats, text, model.temp)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            grads[name] = p.grad / world
    if rank == 0:
        torch.save(grads, sys.argv[1])
    # Both ranks leave together: a rank tearing gloo down while its peer still works got SIGABRT (~1 run in 6).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
