"""The ``blip2`` command: a thin layer over the library's functions.

    blip2 caption IMG... [--model M] [--prompt P] [--json]
    blip2 caption --input FOLDER|GLOB|list.txt|data.jsonl|shard-{0..9}.tar --output OUT.jsonl | --sidecar [CapFilt]
    blip2 caption --merge OUT.jsonl
    blip2 ask IMG QUESTION... [--model M] [--json]
    blip2 convert SRC DST [--to lavis|blip2] [--config PRESET|config.json] [--vision-weights eva_vit_g.pth]
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip2.config import VQA_PROMPT, check_question_template

DEFAULT_MODEL = os.environ.get("BLIP2_MODEL", "blip2-demo/model")


def _print(result: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))


def cmd_caption(args: argparse.Namespace) -> None:
    if args.input is not None or args.merge is not None:
        _caption_dataset(args)
        return
    if not args.images:
        raise ValueError("name the images to caption, or a dataset with --input (see blip2 caption --help)")
    from blip2.checkpoints import load_for_inference

    model = load_for_inference(args.model, args.device, optimize=not args.no_optimize)
    given = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}  # else CAPTION_DEFAULTS
    captions = model.caption(args.images, prompt=args.prompt, **kwargs)
    result = [{"image": str(i), "caption": c} for i, c in zip(args.images, captions, strict=True)]
    _print(result, args.json, [f"{r['image']}: {r['caption']}" for r in result])


def _caption_dataset(args: argparse.Namespace) -> None:
    from blip2.caption import CaptionSettings, merge_parts
    from blip2.caption.job import CaptionJob, describe, run_job

    if args.images or (args.input is not None and args.merge is not None):
        raise ValueError("give image files, --input DATASET or --merge OUT.jsonl, one of them")
    if args.merge is not None:
        captioned, failed = merge_parts(args.merge)
        print(f"merged {captioned} captioned and {failed} unreadable images into {args.merge}")
        return
    given = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    generation: dict[str, Any] = {k: v for k, v in given.items() if v is not None}  # else CAPTION_DEFAULTS
    settings = CaptionSettings(args.batch_size, args.workers, args.prompt, generation, not args.no_progress)
    job = CaptionJob(
        input=args.input,
        model=args.model,
        output=args.output,
        sidecar=args.sidecar,
        shards=args.shards,
        samples_per_shard=args.samples_per_shard,
        image_column=args.image_column,
        text_column=args.text_column,
        image_root=args.image_root,
        device=args.device,
        optimize=not args.no_optimize,
        settings=settings,
        candidates=args.candidates,
        scorer=args.scorer,
        keep=args.keep,
        rerank=args.rerank,
        seed=args.seed,
    )
    path, summary = run_job(job)
    print(describe(path, summary), file=sys.stderr)


def cmd_ask(args: argparse.Namespace) -> None:
    from blip2.checkpoints import load_for_inference

    model = load_for_inference(args.model, args.device, optimize=not args.no_optimize)
    if not hasattr(model, "answer"):
        raise ValueError(f"'{args.model}' is a stage-1 (Q-Former only) model: it has no LLM to answer questions")
    answers = model.answer([args.image] * len(args.questions), args.questions, prompt_template=args.template)
    result = [{"image": args.image, "question": q, "answer": a} for q, a in zip(args.questions, answers, strict=True)]
    _print(result, args.json, [f"{r['question']} -> {r['answer']}" for r in result])


def cmd_convert(args: argparse.Namespace) -> None:
    from blip2.checkpoints import convert

    out = convert(
        args.source,
        args.destination,
        to=args.to,
        preset=args.config,
        llm_prefix=args.llm_prefix,
        vision_weights=args.vision_weights,
    )
    _print({"written": str(out)}, args.json, [f"wrote {out}"])


def cmd_train(args: argparse.Namespace) -> None:
    from blip2.train.recipes import train_from_config

    metrics = train_from_config(args.config, args.overrides)
    _print(metrics, args.json, [f"{k}: {v}" for k, v in metrics.items()])


def cmd_demo(args: argparse.Namespace) -> None:
    from blip2.demo.pipeline import run_demo

    metrics = run_demo(Path(args.output), quick=args.quick, llm=args.llm)
    head = metrics.get("headline") or {}
    lines = [f"demo written to {args.output} (report: {Path(args.output) / 'report.html'})"]
    lines += [f"  {k}: {v}" for k, v in head.items()]
    _print(metrics, args.json, lines)


def cmd_eval(args: argparse.Namespace) -> None:
    from blip2.eval.runner import (
        check_output_path,
        evaluate_from_paths,
        format_summary,
        without_predictions,
        write_results,
    )

    output = check_output_path(args.output) if args.output else None  # before any work, not after it
    result = evaluate_from_paths(
        args.model,
        retrieval_model=args.retrieval_model,
        device=args.device,
        protocol=args.protocol,
        scenes=args.scenes,
        coco_captions=args.coco_captions,
        vqa_questions=args.vqa_questions,
        vqa_annotations=args.vqa_annotations,
        images=args.images,
        caption_prompt=args.prompt,
        vqa_template=args.vqa_template,
        num_beams=args.num_beams,
        answer_words=args.answer_words,
        retrieval_k=args.retrieval_k,
        caption_metric_names=args.metrics or ("BLEU", "CIDEr"),
        max_images=args.max_images,
        keep_predictions=output is not None,
    )
    _print(without_predictions(result), args.json, format_summary(result))
    if output is not None:  # after printing: a failed write loses no metrics
        write_results(result, output)


def cmd_serve(args: argparse.Namespace) -> None:
    from blip2.serve.config import ServeConfig
    from blip2.serve.server import serve

    config = ServeConfig(
        max_batch=args.max_batch,
        queue_size=args.queue_size,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_s=args.keep_alive,
        max_connections=args.max_connections,
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


# ------------------------------------------------------------------------------------------ flag values
# Checked by argparse before any model loads: a bad value ends in one usage line and exit status 2.


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value}" if least == 1 else f"must be 0 or more, got {value}"
        )
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def device_name(text: str) -> str:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available here (torch {torch.__version__}); use cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use cpu, cuda, cuda:N or mps")
    return text


def question_template(text: str) -> str:
    """A prompt template with exactly one ``{}``, where the question goes."""
    try:
        return check_question_template(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ------------------------------------------------------------------------------------------ the commands


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory, LAVIS file or hub id")
        p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")


def _no_optimize(p: argparse.ArgumentParser) -> None:  # inference commands: pre-packed weights by default
    help_text = "keep plain weights (default on CPU: oneDNN pre-packed, same output)"
    p.add_argument("--no-optimize", action="store_true", help=help_text)


def _caption_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*")
    p.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    p.add_argument("--num-beams", type=positive_int, default=None, help="default: 5 (the official setting)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: 30")
    _no_optimize(p)
    _common(p)
    d = p.add_argument_group("datasets (resumable; under torchrun each process writes OUT.rank{r}-of-{n}.jsonl)")
    source_help = "a folder (recursive), a glob, a .txt of paths, a .jsonl/.csv, or shards-{000..009}.tar"
    d.add_argument("--input", default=None, help=source_help)
    d.add_argument("--output", default=None, help="jsonl, appended: a rerun skips the images already in it")
    d.add_argument("--sidecar", action="store_true", help="write IMAGE.txt next to each image")
    d.add_argument("--shards", default=None, metavar="DIR", help="write WebDataset shards (image + captions) here")
    d.add_argument("--samples-per-shard", type=positive_int, default=1000)
    d.add_argument("--image-column", default="image", help="the image path's column in a .jsonl/.csv")
    d.add_argument("--text-column", default=None, help="the original (alt-)text column, scored by CapFilt")
    d.add_argument("--image-root", default=None, help="folder the listed image paths are relative to")
    d.add_argument("--batch-size", type=positive_int, default=16)
    d.add_argument("--workers", type=non_negative_int, default=2, help="image decoding processes")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--merge", default=None, metavar="OUT.jsonl", help="merge the per-process parts of OUT.jsonl")
    c = p.add_argument_group("CapFilt bootstrapping")
    c.add_argument("--candidates", type=positive_int, default=None, help="sample N captions per image (top-p 0.9)")
    c.add_argument("--scorer", default=None, help="stage-1 model whose image-text similarity ranks the captions")
    c.add_argument("--keep", type=positive_int, default=2, help="captions kept per image (best first)")
    c.add_argument("--rerank", choices=("itc", "itm"), default="itc", help="rank by ITC similarity or ITM match")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (mixed with each image's path)")


def _ask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    p.add_argument("questions", nargs="+")
    p.add_argument("--template", type=question_template, default=VQA_PROMPT)
    _no_optimize(p)
    _common(p)


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--to", choices=["blip2", "lavis"], default="blip2")
    p.add_argument("--config", default=None, help="preset name or config.json for LAVIS files, which carry no config")
    p.add_argument("--llm-prefix", choices=["opt", "t5", "llm"], default=None, help="default: from the LLM's type")
    p.add_argument(
        "--vision-weights",
        default=None,
        metavar="FILE",
        help="LAVIS's eva_vit_g.pth, for LAVIS files without the frozen image encoder (the official ones)",
    )
    _common(p, model=False)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 model.preset=tiny")
    _common(p, model=False)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="blip2-demo")
    p.add_argument("--quick", action="store_true", help="tiny sizes, about a minute (for tests)")
    p.add_argument(
        "--llm",
        choices=["demo", "gemma-3-270m"],
        default=None,
        help="the frozen LLM: the text LLM pretrained by the demo (default, configs/demo.yaml) or Gemma 3 270M",
    )
    _common(p, model=False)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--scenes", default=None, help="a scenes split directory (written by blip2 demo)")
    p.add_argument("--coco-captions", default=None, help="COCO-format caption annotations JSON")
    p.add_argument("--vqa-questions", default=None)
    p.add_argument("--vqa-annotations", default=None)
    p.add_argument("--images", default=None, help="image folder for COCO/VQA files")
    p.add_argument("--output", default=None, help="write metrics JSON (with every prediction) here")
    p.add_argument("--retrieval-model", default=None, help="stage-1 (Q-Former) checkpoint for retrieval")
    p.add_argument("--prompt", default=None, help="text the captions continue, e.g. 'a photo of'")
    p.add_argument(
        "--protocol",
        choices=["lavis", "fast"],
        default="lavis",
        help="lavis: the authors' settings per LLM family (5 beams, k=128); fast: greedy, k=16",
    )
    p.add_argument(
        "--vqa-template", type=question_template, default=None, help="VQA prompt (default: the protocol's, LAVIS's)"
    )
    p.add_argument("--answer-words", type=int, default=0, help="keep the first N words of each answer (0: all)")
    p.add_argument("--retrieval-k", type=positive_int, default=None, help="ITC shortlist re-ranked by ITM (lavis: 128)")
    p.add_argument("--metrics", nargs="+", default=None, help="caption metrics (default BLEU CIDEr; METEOR, SPICE)")
    p.add_argument(
        "--num-beams", type=positive_int, default=None, help="beams for captions and VQA (default: the protocol's)"
    )
    p.add_argument("--max-images", type=positive_int, default=None, help="evaluate the first N images only")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=8, help="requests combined into one model call")
    p.add_argument("--queue-size", type=positive_int, default=64, help="waiting requests before answering 503")
    p.add_argument("--max-upload-mb", type=positive_float, default=10.0)
    p.add_argument(
        "--header-timeout", type=positive_float, default=10.0, help="seconds for a request's headers to arrive"
    )
    p.add_argument(
        "--body-timeout", type=positive_float, default=30.0, help="seconds for a request body, +1 s per 10 kB received"
    )
    p.add_argument("--keep-alive", type=positive_float, default=5.0, help="seconds an idle connection stays open")
    p.add_argument("--max-connections", type=positive_int, default=256, help="open connections before answering 503")
    p.add_argument("--torch-threads", type=positive_int, default=None)
    _no_optimize(p)


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


COMMANDS: dict[str, Command] = {
    "caption": Command("caption images", _caption_arguments, cmd_caption),
    "ask": Command("answer questions about an image (zero-shot VQA)", _ask_arguments, cmd_ask),
    "convert": Command("convert a checkpoint (LAVIS <-> this project's format)", _convert_arguments, cmd_convert),
    "train": Command("pretrain (stage 1 or 2) from a YAML recipe", _train_arguments, cmd_train),
    "demo": Command("pretrain a small BLIP-2 offline on synthetic scenes, evaluate, report", _demo_arguments, cmd_demo),
    "eval": Command("evaluate retrieval, captions and VQA", _eval_arguments, cmd_eval),
    "serve": Command("HTTP API and web page", _serve_arguments, cmd_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2", description="BLIP-2: captioning, VQA, retrieval, pretraining")
    parser.add_argument(
        "--debug", action="store_true", help=f"show the full traceback of an error (also: {DEBUG_ENV_VAR}=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


# ------------------------------------------------------------------------------------------ errors

DEBUG_ENV_VAR = "BLIP2_DEBUG"


def user_error_message(exc: BaseException) -> str | None:
    """One line for an error the user can fix (bad file, flag, config, path, divergence); None for a bug."""
    import yaml

    if isinstance(exc, OSError) and not isinstance(exc, ValueError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: '{exc.filename}'"  # e.g. "Permission denied: 'runs/x'"
    if isinstance(exc, yaml.YAMLError):
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        return f"the YAML file could not be parsed{at}: {getattr(exc, 'problem', None) or exc}"
    if isinstance(exc, ValueError | OSError | FloatingPointError | MemoryError):
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except Exception as exc:  # noqa: BLE001 - sorted into user errors (one line) and bugs (traceback) below
        message = user_error_message(exc)
        if message is None or args.debug or os.environ.get(DEBUG_ENV_VAR, "") not in ("", "0"):
            raise
        print(f"blip2 {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blip2 {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
