"""How fast can a small image encoder learn the scenes' shapes and colours on this machine? (issue 4 evidence)

The demo's frozen encoder must carry an object's shape for captions and answers to name it. This probe takes
the demo's image pipeline (scenes rendered at 224 px, resized to 128 px, the demo's normalisation) and trains
an encoder from scratch with the *easiest possible* signal: direct multi-label supervision of which shapes and
which colours are in the image (a linear head on every token, max over tokens, binary cross-entropy). It
prints the held-out split's accuracy every 50 steps: "shape-set" = all four shape labels right, "color-set" =
all eight colour labels right. If an encoder cannot learn shapes from labels within the demo's budget, it
cannot learn them from a contrastive caption loss either, where shape is a far weaker signal.

    python scripts/probe_demo_encoder.py --encoder vit --steps 300    # the demo's ViT (4 x 192, 16-px patches)
    python scripts/probe_demo_encoder.py --encoder cnn --steps 600    # 8 conv layers with BatchNorm
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from blip2.data.scenes import COLORS, SHAPES, make_split, render
from blip2.data.transforms import ImageProcessor
from blip2.demo.settings import DemoSettings, demo_config
from blip2.vision import build_vision_encoder


def labels(examples: list) -> torch.Tensor:
    """(N, 4 + 8): which shapes, then which colours, each scene contains."""
    rows = []
    for ex in examples:
        shapes = {o.shape for o in ex.scene.objects}
        colors = {o.color for o in ex.scene.objects}
        rows.append([float(s in shapes) for s in SHAPES] + [float(c in colors) for c in COLORS])
    return torch.tensor(rows)


class ConvEncoder(nn.Module):
    """Four stages of (3x3 stride-2 conv, BN, ReLU, 3x3 conv, BN, ReLU): 16x downsampling, tokens (B, P, C)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 192)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, 2, 1), nn.BatchNorm2d(w), nn.ReLU()]
            layers += [nn.Conv2d(w, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.net = nn.Sequential(*layers)
        self.hidden_size = c

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels).flatten(2).transpose(1, 2)  # (B, P, C)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=("vit", "cnn"), default="vit")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=None, help="ViT input size (default: the demo's)")
    parser.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default: the demo's)")
    parser.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps")
    args = parser.parse_args()

    settings = DemoSettings()
    if args.image_size:
        settings.image_size = args.image_size
    if args.patch_size:
        settings.patch_size = args.patch_size
    vision = demo_config(settings, with_llm=False).vision
    processor = ImageProcessor.from_vision_config(vision)
    train, test = make_split("train", args.n_train), make_split("test", args.n_test)
    pixels = processor([render(ex.scene) for ex in train])  # (N, 3, 128, 128)
    test_pixels = processor([render(ex.scene) for ex in test])
    y, y_test = labels(train), labels(test)

    torch.manual_seed(0)
    encoder = build_vision_encoder(vision) if args.encoder == "vit" else ConvEncoder()
    encoder.requires_grad_(True)
    head = nn.Linear(int(encoder.hidden_size), y.shape[1])
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    print(
        f"{args.encoder}: {sum(p.numel() for p in encoder.parameters()):,} parameters, {len(train)} train images, "
        f"{tuple(pixels.shape[-2:])} px"
    )
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup) if args.warmup else args.lr
        encoder.train()
        idx = torch.randint(len(pixels), (args.batch_size,), generator=generator)
        logits = head(encoder(pixels[idx])).amax(dim=1)  # (B, 12): max over tokens
        loss = F.binary_cross_entropy_with_logits(logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            encoder.eval()
            with torch.no_grad():
                pred = torch.cat([head(encoder(test_pixels[i : i + 50])).amax(dim=1) for i in range(0, len(test), 50)])
            right = (pred > 0).float() == y_test
            shape_set = right[:, : len(SHAPES)].all(dim=1).float().mean().item()
            color_set = right[:, len(SHAPES) :].all(dim=1).float().mean().item()
            print(
                f"step {step:4d}  {time.perf_counter() - start:5.0f} s  train loss {loss.item():.3f}  "
                f"test shape-set {shape_set:.2f}  per-shape label {right[:, : len(SHAPES)].float().mean():.2f}  "
                f"color-set {color_set:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
