"""The ``blip2`` command: a thin layer over the library's functions.

    blip2 caption IMG... [--model M] [--prompt P] [--json]
    blip2 ask IMG QUESTION... [--model M] [--json]
    blip2 convert SRC DST [--to lavis|blip2] [--config PRESET]
    blip2 train --config configs/x.yaml [key=value ...]
    blip2 demo [--output DIR]
    blip2 eval --model M ...
    blip2 serve --model M [--host H] [--port P]

Errors in the input (a bad image, an unknown model, a mismatched checkpoint) print one line naming the
problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blip2.config import VQA_PROMPT

DEFAULT_MODEL = os.environ.get("BLIP2_MODEL", "blip2-demo/model")


def _print(result: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))


def cmd_caption(args: argparse.Namespace) -> None:
    from blip2.checkpoints import load_for_inference

    model = load_for_inference(args.model, args.device, optimize=not args.no_optimize)
    kwargs: dict[str, Any] = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    captions = model.caption(args.images, prompt=args.prompt, **kwargs)
    result = [{"image": str(i), "caption": c} for i, c in zip(args.images, captions, strict=True)]
    _print(result, args.json, [f"{r['image']}: {r['caption']}" for r in result])


def cmd_ask(args: argparse.Namespace) -> None:
    from blip2.checkpoints import load_for_inference

    model = load_for_inference(args.model, args.device, optimize=not args.no_optimize)
    if not hasattr(model, "answer"):
        raise ValueError(f"'{args.model}' is a stage-1 (Q-Former only) model: it has no LLM to answer questions")
    answers = model.answer([args.image] * len(args.questions), args.questions, prompt_template=args.template)
    result = [{"image": args.image, "question": q, "answer": a} for q, a in zip(args.questions, answers, strict=True)]
    _print(result, args.json, [f"{r['question']} -> {r['answer']}" for r in result])


def cmd_convert(args: argparse.Namespace) -> None:
    from blip2.checkpoints.core import convert

    out = convert(args.source, args.destination, to=args.to, preset=args.config, llm_prefix=args.llm_prefix)
    _print({"written": str(out)}, args.json, [f"wrote {out}"])


def cmd_train(args: argparse.Namespace) -> None:
    from blip2.train.recipes import train_from_config

    metrics = train_from_config(args.config, args.overrides)
    _print(metrics, args.json, [f"{k}: {v}" for k, v in metrics.items()])


def cmd_demo(args: argparse.Namespace) -> None:
    from blip2.demo.pipeline import run_demo

    metrics = run_demo(Path(args.output), quick=args.quick)
    _print(metrics, args.json, [f"demo written to {args.output}"])


def cmd_eval(args: argparse.Namespace) -> None:
    from blip2.eval.runner import main as eval_main

    eval_main(args)


def cmd_serve(args: argparse.Namespace) -> None:
    from blip2.serve.app import ServeConfig, serve

    config = ServeConfig(
        max_batch=args.max_batch,
        queue_size=args.queue_size,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
    )
    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        config=config,
        torch_threads=args.torch_threads,
        optimize=not args.no_optimize,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2", description="BLIP-2: captioning, VQA, retrieval, pretraining")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, model: bool = True) -> None:
        if model:
            p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory, LAVIS file or hub id")
            p.add_argument("--device", default="cpu")
        p.add_argument("--json", action="store_true", help="print JSON")

    def no_optimize(p: argparse.ArgumentParser) -> None:  # inference commands: pre-packed weights by default
        help_text = "keep plain weights (default on CPU: oneDNN pre-packed, same output)"
        p.add_argument("--no-optimize", action="store_true", help=help_text)

    p = sub.add_parser("caption", help="caption images")
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=30)
    no_optimize(p)
    common(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("ask", help="answer questions about an image (zero-shot VQA)")
    p.add_argument("image")
    p.add_argument("questions", nargs="+")
    p.add_argument("--template", default=VQA_PROMPT)
    no_optimize(p)
    common(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("convert", help="convert a checkpoint (LAVIS <-> this project's format)")
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--to", choices=["blip2", "lavis"], default="blip2")
    p.add_argument("--config", default=None, help="preset name for LAVIS files, which carry no config")
    p.add_argument("--llm-prefix", choices=["opt", "t5"], default="opt")
    common(p, model=False)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="pretrain (stage 1 or 2) from a YAML recipe")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 model.preset=tiny")
    common(p, model=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="pretrain a small BLIP-2 offline on synthetic scenes, evaluate, report")
    p.add_argument("--output", default="blip2-demo")
    p.add_argument("--quick", action="store_true", help="tiny sizes, about a minute (for tests)")
    common(p, model=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="evaluate retrieval, captions and VQA")
    common(p)
    p.add_argument("--scenes", default=None, help="a scenes split directory (written by blip2 demo)")
    p.add_argument("--coco-captions", default=None, help="COCO-format caption annotations JSON")
    p.add_argument("--vqa-questions", default=None)
    p.add_argument("--vqa-annotations", default=None)
    p.add_argument("--images", default=None, help="image folder for COCO/VQA files")
    p.add_argument("--output", default=None, help="write metrics JSON (with every prediction) here")
    p.add_argument("--retrieval-model", default=None, help="stage-1 (Q-Former) checkpoint for retrieval")
    p.add_argument("--prompt", default=None, help="text the captions continue, e.g. 'a photo of'")
    p.add_argument("--vqa-template", default=VQA_PROMPT)
    p.add_argument("--answer-words", type=int, default=0, help="keep the first N words of each answer (0: all)")
    p.add_argument("--retrieval-k", type=int, default=16, help="ITC shortlist re-ranked by ITM")
    p.add_argument("--metrics", nargs="+", default=None, help="caption metrics (default BLEU CIDEr; METEOR, SPICE)")
    p.add_argument("--num-beams", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--vqa-caption-context", action="store_true", help="also answer after the model's own caption")
    p.add_argument(
        "--vqa-true-description",
        type=int,
        default=0,
        metavar="N",
        help="scenes: also answer the first N images' questions after their true description (the LLM's ceiling)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="HTTP API and web page")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests combined into one model call")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests before answering 503")
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument("--torch-threads", type=int, default=None)
    no_optimize(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    from blip2.checkpoints.core import CheckpointError

    try:
        func(args)
    except (CheckpointError, ValueError, FileNotFoundError, IsADirectoryError) as exc:
        print(f"blip2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
