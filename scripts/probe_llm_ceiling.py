"""How well can the demo's frozen LLM answer the scene questions when told the answer in words? (issue 4 evidence)

The visual prompt cannot make a frozen LLM answer better than it does when the image is described to it
exactly. This probe writes the true scene description before each held-out question
("{description}. Question: {question} Answer:") and scores Gemma 3 270M two ways, per question type:

- open: greedy generation, first word of the VQA-normalised answer (what the demo's `vqa_true_caption` does);
- ranked: the answer vocabulary of the scenes (colours, shapes, numbers, yes/no, positions: 22 words) ranked
  by the LLM's log-likelihood after the prompt (closed-vocabulary VQA, as BLIP ranks candidate answers).

    python scripts/probe_llm_ceiling.py --images 15      # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
import torch.nn.functional as F

from blip2.checkpoints.offline import gemma3_270m
from blip2.data.scenes import COLORS, NUMBER_WORDS, SHAPES, detailed_caption, make_split
from blip2.eval.vqa import postprocess_answer

POSITIONS = ("left", "right", "top", "bottom", "center")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=15, help="held-out test images (about 7 questions each)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = gemma3_270m()

    items = []  # (prompt, answer, question type)
    for example in make_split("test", args.images):
        description = detailed_caption([o.to_dict() for o in example.scene.objects])
        for q in example.questions:
            items.append((f"{description}. Question: {q.question} Answer:", q.answer, q.type))
    vocab = sorted({*COLORS, *SHAPES, *NUMBER_WORDS[1:], "yes", "no", *POSITIONS})
    candidates = [tokenizer(" " + word, add_special_tokens=False).input_ids for word in vocab]
    width = max(map(len, candidates))

    right: dict[str, dict[str, list[bool]]] = {
        "open": collections.defaultdict(list),
        "ranked": collections.defaultdict(list),
    }
    start = time.perf_counter()
    for prompt, answer, kind in items:
        ids = tokenizer(prompt).input_ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
        said = postprocess_answer(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True), 1)
        # every candidate after the same prompt in one batch; the LM head only where a candidate token is scored
        rows = torch.tensor([ids + c + [0] * (width - len(c)) for c in candidates])  # (V, T)
        hidden = model.model(input_ids=rows).last_hidden_state  # (V, T, D)
        scores = []
        for i, c in enumerate(candidates):
            logp = F.log_softmax(model.lm_head(hidden[i, len(ids) - 1 : len(ids) - 1 + len(c)]).float(), dim=-1)
            scores.append(float(logp[torch.arange(len(c)), torch.tensor(c)].sum()))
        ranked = vocab[max(range(len(vocab)), key=scores.__getitem__)]
        for mode, guess in (("open", said), ("ranked", ranked)):
            right[mode][kind].append(guess == answer)
            right[mode]["overall"].append(guess == answer)
    print(f"{len(items)} questions on {args.images} images, {time.perf_counter() - start:.0f} s")
    for mode, table in right.items():
        print(f"{mode:7s}", "  ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in sorted(table.items())))


if __name__ == "__main__":
    main()
