"""Training-step throughput, measured side by side in one process (medians of repeated steps, as ratios).

    python benchmarks/bench_training.py --stage1 [--vit-layers 4] [--batch 8]
    python benchmarks/bench_training.py --stage2 [--batch 8]
    python benchmarks/bench_training.py --all --small        # quick run with small sizes

Stage 1 (P3): a step that recomputes the frozen image encoder vs a step from the frozen-feature cache, on
the official sizes (EVA ViT-g/14 at ``--vit-layers`` depth, the full 39 with ``--vit-layers 39``, + the
32×768 Q-Former). Stage 2 (P4): a step with the frozen Gemma 3 270M computing logits on the caption tokens
only vs the naive step computing logits for the whole sequence; the achieved FLOP/s of the optimised step
(FLOPs counted by torch's FlopCounterMode) against the machine's measured fp32 matmul peak.
On CUDA the same code runs under bf16 autocast.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from blip2.config import Blip2Config, QFormerConfig, eva_vit_g, official_qformer, small_vit
from blip2.model import Blip2, Blip2QFormer


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_times(fn_a: Callable[[], object], fn_b: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median times of two variants measured alternately (a, b, a, b, ...) after one warm-up each, so that a
    change in the machine's load during the run affects both alike."""
    fn_a()
    fn_b()
    times_a, times_b = [], []
    for _ in range(reps):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def _autocast() -> torch.autocast | torch.autograd.grad_mode.no_grad:
    if _device().type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> float:
    with _autocast():
        loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def stage1(args: argparse.Namespace) -> float:
    dev = _device()
    if args.small:
        vision, qformer = (
            small_vit(hidden_size=384, layers=6, heads=6),
            QFormerConfig(
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=6,
                intermediate_size=1536,
                encoder_hidden_size=384,
                num_query_tokens=32,
            ),
        )
        label = "small ViT-S/16 (6 layers) + 6×384 Q-Former"
    else:
        vision, qformer = eva_vit_g(), official_qformer(use_text=True)
        vision.hf_config["num_hidden_layers"] = args.vit_layers
        label = f"EVA ViT-g/14 with {args.vit_layers} of 39 blocks + 12×768 Q-Former, 32 queries"
    torch.manual_seed(0)
    model = Blip2QFormer(Blip2Config(vision=vision, qformer=qformer)).to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    b = args.batch
    pixels = torch.randn(b, 3, vision.image_size, vision.image_size, device=dev)
    ids = torch.randint(1000, 20000, (b, 32), device=dev)
    ids[:, 0] = qformer.cls_token_id
    mask = torch.ones_like(ids)
    features = model.image_features(pixels)  # what the cache stores: (B, P, Dv)
    live, cached = paired_median_times(
        lambda: train_step(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, opt),
        lambda: train_step(model, {"input_ids": ids, "attention_mask": mask, "image_features": features}, opt),
        args.reps,
    )
    print(f"stage 1 [{label}], batch {b}, {dev.type}:")
    print(f"  encoder in the loop: {live:.3f} s/step ({b / live:.2f} samples/s)")
    print(f"  frozen-feature cache: {cached:.3f} s/step ({b / cached:.2f} samples/s)")
    ratio = live / cached
    print(f"stage1 cache speed-up: {ratio:.2f}x")
    return ratio


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured fp32 (or bf16 on CUDA) matmul throughput in FLOP/s: the machine's practical peak."""
    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = median_time(lambda: a @ b, reps, warmup=2)
    return 2 * n**3 / t


def stage2(args: argparse.Namespace) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    dev = _device()
    torch.manual_seed(0)
    if args.small:
        from blip2.config import tiny_config

        cfg = tiny_config("opt")
        cfg.llm.hf_config.update(
            hidden_size=256, num_hidden_layers=4, ffn_dim=1024, vocab_size=32000, word_embed_proj_dim=256
        )
        label = "OPT-style 4×256 LM, vocab 32000 (random)"
        model = Blip2(cfg)
    else:
        from blip2.checkpoints.offline import gemma3_llm_config

        cfg = Blip2Config(
            vision=small_vit(hidden_size=384, layers=6, heads=6),
            qformer=QFormerConfig(
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=6,
                intermediate_size=1536,
                encoder_hidden_size=384,
                num_query_tokens=args.queries,
                use_text=False,
            ),
            llm=gemma3_llm_config(),
        )
        label = f"frozen Gemma 3 270M, {args.queries} queries"
        model = Blip2(cfg, pretrained_llm=True)
    model = model.to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    b, t = args.batch, args.text_len
    vocab = model.language_model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(10, min(vocab, 30000), (b, t), device=dev)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :2] = -100  # e.g. BOS + prompt
    features = model.image_features(torch.randn(b, 3, 224, 224, device=dev))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "image_features": features}
    target_only, full = paired_median_times(
        lambda: train_step(model, batch, opt), lambda: train_step(model, {**batch, "full_logits": True}, opt), args.reps
    )
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, batch, opt)
    flops = counter.get_total_flops()
    peak = matmul_peak()
    achieved = flops / target_only
    print(f"stage 2 [{label}], batch {b} × ({model.config.num_query_tokens} prompt + {t} text) tokens, {dev.type}:")
    print(f"  logits for the whole sequence: {full:.3f} s/step")
    print(f"  logits on target tokens only:  {target_only:.3f} s/step")
    print(
        f"  step FLOPs {flops / 1e9:.1f} GFLOP -> {achieved / 1e9:.1f} GFLOP/s; measured matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s ({100 * achieved / peak:.0f}% of peak)"
    )
    ratio = full / target_only
    print(f"stage2 target-only logits speed-up: {ratio:.2f}x")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", action="store_true")
    parser.add_argument("--stage2", action="store_true")
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--small", action="store_true", help="small sizes, a quick run")
    parser.add_argument("--vit-layers", type=int, default=4, help="EVA ViT-g depth for stage 1 (39 = full)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.stage1 or args.stage2 or args.all):
        args.all = True
    if args.stage1 or args.all:
        stage1(args)
    if args.stage2 or args.all:
        stage2(args)


if __name__ == "__main__":
    main()
