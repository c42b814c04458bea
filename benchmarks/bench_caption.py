"""Dataset captioning throughput: ``blip2.caption`` (DataLoader workers decoding, prefix caching, pre-packed
weights on CPU, bf16 autocast on CUDA) against the loop a user writes with transformers
(``Blip2ForConditionalGeneration.generate`` over batches of PIL images), on the same random model, the same
images and generation settings, side by side in one process (alternating repetitions, medians). The captions
must be identical; the last line is the ratio.

    python benchmarks/bench_caption.py                          # small widths, ViT 2 layers, OPT 2 layers
    python benchmarks/bench_caption.py --images 256 --batch 16 --vit-layers 39 --llm-layers 32 --full-widths

Both sides read the JPEG files from disk each repetition and write nothing but captions (ours: a jsonl file,
a fresh one each repetition). Random weights are created once in transformers' format (``--cache-dir``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import CAPTION, hf_checkpoint, official_config, word_tokenizer_for  # noqa: E402

from blip2.caption import CaptionSettings, JsonlSink, caption_dataset, list_items  # noqa: E402
from blip2.checkpoints import load_for_inference  # noqa: E402


def make_images(folder: Path, n: int, size: int = 320) -> list[Path]:
    """``n`` JPEG photos of random noise over a gradient (distinct images, realistic decode cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        ramp = torch.linspace(0, 255, size)[None, :, None].expand(size, size, 3)
        noise = torch.rand(size, size, 3, generator=g) * 80
        pixels = ((ramp + noise + i * 7) % 256).to(torch.uint8).numpy()
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def transformers_loop(
    model: Any, processor: Any, tokenizer: Any, paths: list[Path], batch: int, device: str
) -> list[str]:
    """What the transformers documentation shows, in batches: open, process, generate, decode."""
    out: list[str] = []
    for start in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + batch]]
        pixels = processor(images=images, return_tensors="pt").pixel_values.to(device)
        with torch.no_grad(), _autocast(device):
            generated = model.generate(pixel_values=pixels, **CAPTION)
        out.extend(t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True))
    return out


def ours_loop(model: Any, folder: Path, scratch: Path, batch: int, workers: int) -> list[str]:
    out = scratch / f"run{time.perf_counter_ns()}.jsonl"
    settings = CaptionSettings(batch_size=batch, workers=workers, generation=CAPTION, progress=False)
    caption_dataset(model, list_items(str(folder)), JsonlSink(out), settings)
    import json

    return [json.loads(line)["caption"] for line in out.read_text().splitlines()]


def _autocast(device: str) -> Any:
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--vit-layers", type=int, default=2)
    p.add_argument("--llm-layers", type=int, default=2)
    p.add_argument("--full-widths", action="store_true", help="official widths (ViT-g, OPT-2.7B) instead of small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "blip2-bench")
    args = p.parse_args()

    from transformers import Blip2ForConditionalGeneration, BlipImageProcessor

    cfg = official_config(args.vit_layers, args.llm_layers, small=not args.full_widths)
    tag = f"caption-vit{args.vit_layers}-llm{args.llm_layers}{'' if args.full_widths else '-small'}"
    directory = hf_checkpoint(cfg, args.cache_dir, tag)
    tokenizer = word_tokenizer_for(cfg.llm.hf_config["vocab_size"])
    image_token = tokenizer.convert_ids_to_tokens(cfg.llm.image_token_index)
    tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})  # as Blip2Processor's "<image>"
    tokenizer.save_pretrained(directory)

    hf = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval().to(args.device)
    v = cfg.vision
    processor = BlipImageProcessor(
        size={"height": v.image_size, "width": v.image_size}, image_mean=list(v.image_mean), image_std=list(v.image_std)
    )
    ours = load_for_inference(str(directory), args.device, optimize=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        paths = make_images(folder, args.images)
        runs = {
            "transformers": lambda: transformers_loop(hf, processor, tokenizer, paths, args.batch, args.device),
            "blip2 caption": lambda: ours_loop(ours, folder, Path(tmp), args.batch, args.workers),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        captions: dict[str, list[str]] = {}
        for rep in range(args.reps):
            for name, run in runs.items():
                start = time.perf_counter()
                captions[name] = run()
                times[name].append(time.perf_counter() - start)
                print(f"  rep {rep + 1}/{args.reps} {name:<14} {times[name][-1]:7.2f} s", flush=True)

    same = captions["transformers"] == captions["blip2 caption"]
    print(f"{args.images} images, batch {args.batch}, {CAPTION}, {args.device}, threads {torch.get_num_threads()}")
    rates = {name: args.images / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"  {name:<14} median {statistics.median(times[name]):7.2f} s  {rate:7.2f} images/s")
    print(f"  captions identical: {same} (e.g. {captions['transformers'][0]!r})")
    if not same:
        raise SystemExit("captions differ between transformers and blip2 caption")
    print(f"blip2 caption vs the transformers loop: {rates['blip2 caption'] / rates['transformers']:.2f}x images/s")


if __name__ == "__main__":
    main()
