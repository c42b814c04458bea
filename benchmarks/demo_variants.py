"""Variants of the offline demo's BLIP-2 stages, measured on its test split: how the README's "Offline demo"
ablations were made.

A variant is the committed recipe (``configs/demo.yaml``) with a JSON override on top (sections merged key by
key). It runs in ``--root/NAME`` and reuses every finished step of ``--base`` (a previous ``blip2 demo
--output BASE`` run: its scenes, frozen image encoder, text LLM and stage runs) whose cache key it shares, so a
stage-1 variant costs only its stage 1, a stage-2 variant only its stage 2. It prints (and appends to
``--root/results.jsonl``) the stage times, stage-1 retrieval on the first 100 test images (five captions per
image, and each image's full description), the stage-1 Q-Former's own captions (ITG, greedy, first 60 test
images) scored by attribute accuracy, and with ``--stage2`` the stage-2 captions and zero-shot VQA.

    python benchmarks/demo_variants.py base '{}' --base blip2-demo --stage2
    python benchmarks/demo_variants.py q16 '{"num_query_tokens": 16}' --base blip2-demo --stage2
    python benchmarks/demo_variants.py chunk '{"text_llm": {"chunk_probability": 0.3, "steps": 600}}' --stage2

Run one at a time with ``OMP_NUM_THREADS=2`` and nothing else on the machine: the times are part of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from blip2.data.scenes import detailed_caption
from blip2.demo.pipeline import Pipeline, cache_keys
from blip2.demo.settings import DemoSettings
from blip2.eval.runner import eval_captions, eval_retrieval, eval_vqa
from blip2.eval.scenes import attribute_accuracy, load_scenes_eval

N_EVAL, N_ITG = 100, 60


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top: nested sections merged key by key (``lr_multipliers`` replaced)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "lr_multipliers":
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def link_cache(base: Path, out: Path) -> None:
    """Symlink ``base``'s scenes and cached steps into ``out``: steps whose key the variant shares are reused."""
    (out / "cache").mkdir(parents=True, exist_ok=True)
    if (base / "cache").is_dir():
        for entry in (base / "cache").iterdir():
            target = out / "cache" / entry.name
            if not target.exists() and not entry.name.startswith("eval-"):
                os.symlink(entry.resolve(), target)
    if (base / "data").is_dir() and not (out / "data").exists():
        os.symlink((base / "data").resolve(), out / "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("override", nargs="?", default="{}", help="JSON merged onto configs/demo.yaml")
    parser.add_argument("--base", type=Path, default=Path("blip2-demo"), help="a finished demo output to reuse")
    parser.add_argument("--root", type=Path, default=Path("demo-variants"))
    parser.add_argument("--stage2", action="store_true", help="also train stage 2 and score captions and VQA")
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True, warn_only=True)  # as `run_demo`
    override = json.loads(args.override)
    settings = DemoSettings.from_dict(merged(DemoSettings.load().to_dict(), override))
    out = args.root / args.name
    link_cache(args.base, out)
    pipeline = Pipeline(settings, out, cache_keys(settings))
    data_dir = pipeline.data()
    encoder = pipeline.image_encoder(data_dir)
    started = time.perf_counter()
    stage1 = pipeline.stage1(encoder)
    result: dict[str, Any] = {
        "name": args.name,
        "override": override,
        "stage1_s": round(time.perf_counter() - started, 1),
    }
    log = pipeline.training_log("stage1")
    result["stage1_last"] = log[-1] if log else None

    data = load_scenes_eval(data_dir / "test")
    ids = list(data["references"])[:N_EVAL]
    paths = [data["paths"][i] for i in ids]
    captions = eval_retrieval(stage1, paths, [data["references"][i] for i in ids], k=settings.retrieval_k)
    described = eval_retrieval(
        stage1, paths, [[detailed_caption(data["objects"][i])] for i in ids], k=settings.retrieval_k
    )
    for key, r in (("retrieval_captions", captions), ("retrieval", described)):
        result[key] = {k: r[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1")} | {"itc_only_i2t_r1": r["itc_only"]["i2t_r1"]}
    itg = stage1.caption(paths[:N_ITG], num_beams=1, max_new_tokens=40, min_new_tokens=2, batch_size=32)
    result["stage1_captions"] = attribute_accuracy(itg, [data["objects"][i] for i in ids[:N_ITG]])

    if args.stage2:
        llm = pipeline.llm(data_dir)
        result["llm_ceiling"] = (llm.get("ceiling") or {}).get("overall")
        started = time.perf_counter()
        stage2 = pipeline.stage2(encoder, llm, stage1)
        result["stage2_s"] = round(time.perf_counter() - started, 1)
        log = pipeline.training_log("stage2")
        result["stage2_last"] = log[-1] if log else None
        c = eval_captions(
            stage2,
            {i: data["paths"][i] for i in ids},
            data["references"],
            prompt=settings.caption_prompt,
            generation=settings.caption_generation,
            metric_names=[],
            objects=data["objects"],
            batch_size=settings.eval_batch_size,
            progress=False,
        )
        result["captions"] = c["attributes"]
        wanted = {q: a for q, a in data["annotations"].items() if data["questions"][q]["image_id"] in set(ids)}
        v = eval_vqa(
            stage2,
            data["questions"],
            wanted,
            data["paths"],
            template=settings.vqa_template,
            generation=settings.vqa_generation,
            answer_words=settings.answer_words,
            batch_size=settings.eval_batch_size,
            progress=False,
        )
        result["vqa"] = {"overall": v["overall"], "per_type": v["per_type"]}
    print(json.dumps(result))
    with (args.root / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
