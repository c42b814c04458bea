"""Inference speed against transformers' BLIP-2: captioning (P1), several questions about one image (P2), and
retrieval re-ranking (P5). Every section prints its ratio on its last line.

    python benchmarks/bench_inference.py --p1 --p2 --p5          # reduced depth: ViT-g 4 layers, OPT-2.7B 4 layers
    python benchmarks/bench_inference.py --p1 --full             # the official sizes (ViT-g 39 layers, OPT-2.7B 32)
    python benchmarks/bench_inference.py --small                 # a quick run (tiny widths, 1 repetition)
    python benchmarks/bench_inference.py --gpu                   # P1 on CUDA with bf16 autocast (skipped without)

P1/P2 use random weights at the official widths (EVA ViT-g/14, 32 x 768 Q-Former, OPT-2.7B), created once in
transformers' format (``--cache-dir``). The transformers model and ours share the same weight tensors (ours is
built on the meta device and given transformers' tensors), so the weights are in memory once. Timings alternate
between the implementations within one process; medians of ``--reps`` repetitions.

"ours" is ``Blip2.generate`` / ``Blip2.answer`` (the LLM prompt runs once per row / once per image instead of
once per beam); "ours+packed" adds ``blip2.inference.fast.optimize_for_cpu_inference`` (oneDNN pre-packed weights
for the frozen ViT and LLM, CPU only, inference only). Token identity with transformers is checked and printed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from blip2.checkpoints.hf import config_from_hf, hf_to_ours
from blip2.config import Blip2Config, from_name, small_vit, tiny_config
from blip2.inference.fast import optimize_for_cpu_inference
from blip2.model import Blip2

CAPTION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
VQA = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}
QUESTIONS = [
    "what color is the large circle ?",
    "how many shapes are there ?",
    "is there a red square on the left ?",
    "where is the small blue triangle ?",
    "what shape is at the top of the picture ?",
]


# ----------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------


def _statm() -> tuple[int, int]:
    """(resident, resident file-backed) bytes: memory-mapped checkpoint pages count in the first, and the OS
    can drop them at any time (they are re-read from disk), so the difference is the memory truly in use."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, int(fields[2]) * page


def rss_bytes() -> int:
    return _statm()[0]


class PeakRSS:
    """Samples the resident set size every 10 ms in a thread; ``peak`` is the largest value seen, ``peak_anon``
    the largest not backed by a file (RSS less memory-mapped weights)."""

    def __init__(self) -> None:
        self.peak = 0
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def _sample(self) -> None:
        resident, shared = _statm()
        self.peak = max(self.peak, resident)
        self.peak_anon = max(self.peak_anon, resident - shared)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._sample()


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


class Results:
    """Wall seconds, process CPU seconds (less sensitive to other load on a shared machine), peak RSS and the
    last output of each implementation."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.peak: dict[str, int] = {}
        self.peak_anon: dict[str, int] = {}
        self.out: dict[str, Any] = {}

    def summary(self, name: str) -> str:
        return (
            f"median {med(self.wall[name]):7.2f} s wall, {med(self.cpu[name]):7.2f} s CPU, "
            f"peak RSS {gib(self.peak[name])} (not file-backed {gib(self.peak_anon[name])})"
        )


def alternate(runs: dict[str, Callable[[], Any]], reps: int, device: torch.device, res: Results) -> Results:
    """Run each callable ``reps`` times, alternating between them, recording into ``res``."""
    for rep in range(reps):
        for name, fn in runs.items():
            cpu = time.process_time()
            with PeakRSS() as rss:
                t, res.out[name] = timed(fn, device)
            cpu = time.process_time() - cpu
            res.cpu.setdefault(name, []).append(cpu)
            res.wall.setdefault(name, []).append(t)
            res.peak[name] = max(res.peak.get(name, 0), rss.peak)
            res.peak_anon[name] = max(res.peak_anon.get(name, 0), rss.peak_anon)
            print(
                f"  rep {rep + 1}/{reps} {name:<12} {t:8.2f} s wall {cpu:8.2f} s CPU   "
                f"peak RSS {gib(rss.peak)} ({gib(rss.peak_anon)} not file-backed)",
                flush=True,
            )
    return res


def med(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------------------------------------
# models: random weights at the official widths, saved once in transformers' format, shared with ours
# ----------------------------------------------------------------------------------------------------------


def official_config(vit_layers: int, llm_layers: int, small: bool) -> Blip2Config:
    cfg = from_name("blip2-opt-2.7b")
    cfg.vision.hf_config["num_hidden_layers"] = vit_layers
    cfg.llm.hf_config["num_hidden_layers"] = llm_layers
    if small:  # quick run: official structure at small widths
        cfg.vision = small_vit(hidden_size=128, layers=vit_layers, heads=4)
        cfg.qformer.encoder_hidden_size = 128
        cfg.qformer.num_hidden_layers = 2
        cfg.llm.hf_config.update(hidden_size=256, ffn_dim=1024, num_attention_heads=8, word_embed_proj_dim=256)
    return cfg


def _initialise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial random weights (transformers initialises the ViT at std 1e-10): N(0, 0.02), unit norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name.lower() or "layer_norm" in name) and name.endswith("weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.normal_(0.0, 0.02, generator=g) if "bias" not in name else p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)


def hf_checkpoint(cfg: Blip2Config, cache_dir: Path, tag: str) -> Path:
    """Random transformers BLIP-2 weights for ``cfg``, written once to ``cache_dir/tag``."""
    import sys

    from transformers import Blip2ForConditionalGeneration

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hf_reference import hf_config

    directory = cache_dir / tag
    if (directory / "config.json").exists():
        return directory
    print(f"creating random weights in {directory} (once) ...", flush=True)
    model = Blip2ForConditionalGeneration(hf_config(cfg)).eval()
    _initialise(model)
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    del model
    gc.collect()
    tmp.rename(directory)
    return directory


def load_pair(directory: Path) -> tuple[Any, Blip2]:
    """transformers' model from ``directory`` and ours sharing its weight tensors (no second copy)."""
    from transformers import Blip2ForConditionalGeneration

    hf = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    with torch.device("meta"):
        ours = Blip2(cfg)
    state = hf_to_ours(hf.state_dict())
    ours.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in list(ours.named_parameters()) + list(ours.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"weights not shared from transformers' model: {left[:5]}")
    return hf, ours.eval()


def word_tokenizer_for(vocab_size: int) -> Any:
    """A word-level tokenizer over the test vocabulary, OPT's special ids, BOS prepended as OPT does."""
    from tokenizers import processors

    from blip2.testing import word_tokenizer

    tok = word_tokenizer({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, vocab_size=vocab_size)
    tok.add_special_tokens({"bos_token": "</s>", "pad_token": "<pad>", "eos_token": "</s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok.padding_side = "left"
    return tok


def autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@contextmanager
def section(title: str) -> Any:
    print(f"\n=== {title} ===", flush=True)
    start = time.perf_counter()
    yield
    print(f"(section took {time.perf_counter() - start:.0f} s)", flush=True)


def ratio_line(title: str, res: Results, packed_name: str | None) -> str:
    def r(times: dict[str, list[float]], name: str) -> float:
        return med(times["transformers"]) / med(times[name])

    line = f"{title}: {r(res.wall, 'ours'):.2f}x wall ({r(res.cpu, 'ours'):.2f}x CPU time)"
    if packed_name:
        line += f"; with pre-packed weights {r(res.wall, packed_name):.2f}x wall ({r(res.cpu, packed_name):.2f}x CPU)"
    return line


# ----------------------------------------------------------------------------------------------------------
# P1: captioning
# ----------------------------------------------------------------------------------------------------------


def profile_p1(hf: Any, ours: Blip2, pixels: torch.Tensor, device: torch.device) -> None:
    """Where the time goes: image encoder, Q-Former + projection, LLM generation (one run each)."""
    with torch.no_grad(), autocast(device):
        t_vit, feats = timed(lambda: hf.vision_model(pixels).last_hidden_state, device)
        t_q, prompt = timed(lambda: ours.visual_prompt(pixels), device)
        q = ours.config.num_query_tokens
        ids = torch.tensor([[ours.config.llm.image_token_index] * q + [2]], device=device).repeat(pixels.shape[0], 1)
        embeds, mask, _ = ours._llm_inputs(prompt, ids, None)
        t_hf_llm, _ = timed(
            lambda: hf.language_model.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **CAPTION),
            device,
        )
        t_ours_llm, _ = timed(lambda: ours.generate(visual_prompt=prompt, input_ids=ids, **CAPTION), device)
    print(
        f"  profile: ViT {t_vit:.2f} s | ViT+Q-Former+projection {t_q:.2f} s | "
        f"LLM generate: transformers {t_hf_llm:.2f} s, ours (prefix cache) {t_ours_llm:.2f} s"
    )


def run_p1(args: argparse.Namespace, device: torch.device) -> None:
    vit, llm = (39, 32) if args.full else (args.vit_layers, args.llm_layers)
    cfg = official_config(vit, llm, args.small)
    size = f"{'small widths' if args.small else 'official widths'}, ViT {vit} layers, OPT-2.7B {llm} layers"
    with section(f"P1 captioning ({size}; batch {args.batch}, {CAPTION}, {device.type})"):
        directory = hf_checkpoint(cfg, args.cache_dir, f"opt2.7b-vit{vit}-llm{llm}{'-small' if args.small else ''}")
        base_rss = rss_bytes()
        hf, ours = load_pair(directory)
        print(f"  weights loaded once, shared: RSS {gib(rss_bytes())} (before loading {gib(base_rss)})")
        hf.to(device)
        ours.to(device)
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(args.batch, 3, 224, 224, generator=g).to(device)

        def hf_run() -> torch.Tensor:
            with torch.no_grad(), autocast(device):
                return hf.generate(pixel_values=pixels, **CAPTION)

        def ours_run() -> torch.Tensor:
            with torch.no_grad(), autocast(device):
                return ours.generate(pixel_values=pixels, **CAPTION)

        if args.profile:
            profile_p1(hf, ours, pixels, device)
        runs: dict[str, Callable[[], Any]] = {"transformers": hf_run, "ours": ours_run}
        res = alternate(runs, args.reps, device, Results())
        packed_name = None
        if device.type == "cpu" and not args.no_pack:
            # packing replaces the weights it packs: free transformers' model first (the tensors are shared)
            del hf, runs
            gc.collect()
            optimize_for_cpu_inference(ours)
            gc.collect()
            packed_name = "ours+packed"
            alternate({packed_name: ours_run}, args.reps, device, res)
        ref = res.out["transformers"].tolist()
        for name in res.wall:
            same = res.out[name].tolist() == ref
            print(
                f"  {name:<12} {res.summary(name)}  {args.batch / med(res.wall[name]):.3f} images/s  "
                f"tokens identical to transformers: {same}"
            )
        print(ratio_line("P1 ratio (images/s ours / transformers)", res, packed_name))


# ----------------------------------------------------------------------------------------------------------
# P2: five questions about one image
# ----------------------------------------------------------------------------------------------------------


def run_p2(args: argparse.Namespace, device: torch.device) -> None:
    from PIL import Image

    from blip2.inference.tasks import llm_prompt_ids, pixel_values

    vit, llm = (39, 32) if args.full else (args.vit_layers, args.llm_layers)
    cfg = official_config(vit, llm, args.small)
    size = f"{'small widths' if args.small else 'official widths'}, ViT {vit} layers, OPT-2.7B {llm} layers"
    with section(f"P2 five questions about one image ({size}; {VQA}, {device.type})"):
        directory = hf_checkpoint(cfg, args.cache_dir, f"opt2.7b-vit{vit}-llm{llm}{'-small' if args.small else ''}")
        hf, ours = load_pair(directory)
        hf.to(device)
        ours.to(device)
        ours.tokenizer = word_tokenizer_for(cfg.llm.hf_config["vocab_size"])
        g = torch.Generator().manual_seed(1)
        image = Image.fromarray((torch.rand(224, 224, 3, generator=g) * 255).byte().numpy())
        pixels = pixel_values(ours, [image])
        prompts = [llm_prompt_ids(ours, [f"Question: {q} Answer:"]) for q in QUESTIONS]
        tok = ours.tokenizer

        def hf_one_by_one() -> list[str]:
            answers = []
            with torch.no_grad(), autocast(device):
                for ids, mask in prompts:
                    out = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **VQA)
                    answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
            return answers

        def ours_run() -> list[str]:
            with autocast(device):
                return ours.answer(image, QUESTIONS)

        def ours_plain() -> list[str]:
            with autocast(device):
                return ours.answer(image, QUESTIONS, shared_prefix=False)

        runs = {"transformers": hf_one_by_one, "ours-batched": ours_plain, "ours": ours_run}
        res = alternate(runs, args.reps, device, Results())
        packed_name = None
        if device.type == "cpu" and not args.no_pack:
            del hf, runs
            gc.collect()
            optimize_for_cpu_inference(ours)
            packed_name = "ours+packed"
            alternate({packed_name: ours_run}, args.reps, device, res)
        for name in res.wall:
            print(
                f"  {name:<12} {res.summary(name)}  answers identical to transformers: "
                f"{res.out[name] == res.out['transformers']}"
            )
        print(f"  answers: {res.out['ours']}")
        print("  (ours-batched: the 5 questions in one LLM call, image encoded once, no shared-prefix cache)")
        print(ratio_line("P2 ratio (transformers one by one / ours)", res, packed_name))


# ----------------------------------------------------------------------------------------------------------
# P5: retrieval, ITC shortlist + ITM re-rank vs ITM over all pairs
# ----------------------------------------------------------------------------------------------------------


def run_p5(args: argparse.Namespace, device: torch.device) -> None:
    from blip2.inference.tasks import _itm_scores, qformer_text_ids, retrieve
    from blip2.model import Blip2QFormer
    from blip2.testing import WORDS, tiny_bert_tokenizer

    n_img, n_txt, k = (200, 1000, 32) if args.small else (1000, 5000, 128)
    with section(f"P5 retrieval (tiny config, {n_img} images x {n_txt} texts, k={k}, {device.type})"):
        torch.manual_seed(0)
        model = Blip2QFormer(tiny_config(None)).eval().to(device)
        model.tokenizer = tiny_bert_tokenizer()
        g = torch.Generator().manual_seed(0)
        words = [w for w in WORDS if w.isalpha()]
        texts = [
            " ".join(
                words[i]
                for i in torch.randint(len(words), (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
            )
            for _ in range(n_txt)
        ]
        pixels = torch.randn(n_img, 3, 32, 32, generator=g).to(device)
        with torch.no_grad():  # the feature cache: image embeddings and ITC features, computed once
            t_cache, image_embeds = timed(lambda: torch.cat([model.encode_image(p) for p in pixels.split(256)]), device)
            image_feats = torch.cat([model.image_embeddings(e)[0] for e in image_embeds.split(256)])
        print(f"  image feature cache: {t_cache:.2f} s (not counted below)")

        def rerank() -> dict[str, Any]:
            return retrieve(model, None, texts, k=k, batch_size=256, image_feats=image_feats, image_embeds=image_embeds)

        res = alternate({"itc+itm@k": rerank}, args.reps, device, Results())
        # all pairs: ITM over a subset of pairs, extrapolated linearly to n_img * n_txt
        ids, mask = qformer_text_ids(model, texts)
        subset = 20_000 if not args.small else 5_000
        img_idx = torch.arange(subset, device=device) % n_img
        txt_idx = torch.randint(n_txt, (subset,), generator=g).to(device)
        with torch.no_grad():
            t_sub = med(
                [
                    timed(lambda: _itm_scores(model, image_embeds, ids, mask, img_idx, txt_idx, 256), device)[0]
                    for _ in range(args.reps)
                ]
            )
        all_pairs = t_sub * (n_img * n_txt) / subset
        t = med(res.wall["itc+itm@k"])
        out = res.out["itc+itm@k"]
        print(f"  ITC + ITM re-rank of top-{k} (both directions): median {t:.2f} s")
        print(
            f"  ITM over all {n_img * n_txt:,} pairs: {all_pairs:.0f} s (extrapolated linearly from {subset:,} pairs, "
            f"{t_sub:.2f} s)"
        )
        print(f"  i2t ranking shape {tuple(out['i2t_ranking'].shape)}, t2i {tuple(out['t2i_ranking'].shape)}")
        print(f"P5 ratio (all-pairs ITM / ITC + ITM@{k}): {all_pairs / t:.1f}x")


def run_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("\n=== GPU (P1 with bf16 autocast) ===\nskipped: no CUDA device")
        return
    gpu_args = copy.copy(args)
    gpu_args.no_pack = True
    run_p1(gpu_args, torch.device("cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p1", action="store_true", help="captioning, batch of images, beam search")
    parser.add_argument("--p2", action="store_true", help="five questions about one image")
    parser.add_argument("--p5", action="store_true", help="retrieval: ITC + ITM re-rank vs all-pairs ITM")
    parser.add_argument("--gpu", action="store_true", help="P1 on CUDA with bf16 autocast (skipped without)")
    parser.add_argument("--small", action="store_true", help="quick run: small widths, 1 repetition")
    parser.add_argument("--full", action="store_true", help="official depths (ViT-g 39 layers, OPT-2.7B 32)")
    parser.add_argument("--vit-layers", type=int, default=4)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="P1: time ViT, Q-Former and LLM separately")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1: CPU times robust to other load)")
    parser.add_argument("--no-pack", action="store_true", help="skip the pre-packed-weights variant")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("BLIP2_BENCH_CACHE", "~/.cache/blip2-bench"))
    )
    args = parser.parse_args()
    args.cache_dir = args.cache_dir.expanduser()
    if args.small:
        args.reps = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.p1 or args.p2 or args.p5 or args.gpu):
        args.p1 = args.p2 = args.p5 = args.gpu = True
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cache {args.cache_dir}")
    device = torch.device("cpu")
    if args.p1:
        run_p1(args, device)
    if args.p2:
        run_p2(args, device)
    if args.p5:
        run_p5(args, device)
    if args.gpu:
        run_gpu(args)
    print(f"\nprocess peak RSS (ru_maxrss): {gib(__import__('resource').getrusage(0).ru_maxrss * 1024)}")


if __name__ == "__main__":
    main()
