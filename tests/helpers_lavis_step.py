"""One stage-1 training step with the authors' code (LAVIS ``Blip2Qformer.forward``), for test_lavis_parity.py.

Runs in a separate interpreter that has LAVIS's dependencies (transformers 4.33); it imports nothing from
this project. LAVIS's own modules run unchanged (``blip2_qformer.py``, ``blip2.py``, ``Qformer.py``,
``base_model.py``, ``dist_utils.py``); only what a tiny CPU model does not need is left out:

- the model registry, EVA/CLIP ViT builders, file/URL helpers and omegaconf are stubbed as empty modules;
- the image encoder is ``nn.Identity`` (the batch holds the frozen encoder's features; LAVIS's own
  ``ln_vision`` follows it), the BERT config and weights come from ``inputs.pt`` instead of the hub, and
  the tokenizer returns the batch's token ids (tokenisation is not what is compared);
- the step runs in the batch's dtype (float64 in the test): ``blip2.LayerNorm``'s fp16 guard, a cast to
  float32 that is the identity in float32, is bypassed for float64;
- ``torch.multinomial`` replays the hard negatives our side drew, in LAVIS's order (one negative image per
  text, then one negative text per image).

LAVIS always trains under ``torch.distributed`` (its forward calls ``dist.get_rank()``), also on one GPU, so
a one-process gloo group is set up: ``concat_all_gather`` then really gathers, without gradient.

usage: python helpers_lavis_step.py LAVIS_SRC WORK_DIR   (reads WORK_DIR/inputs.pt, writes WORK_DIR/lavis.pt)
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any


def _stub(name: str, **attrs: Any) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


class _Registry:
    @staticmethod
    def register_model(_name: str) -> Any:
        return lambda cls: cls


def main() -> None:
    src, work = sys.argv[1], Path(sys.argv[2])
    sys.path.insert(0, src)
    import transformers  # noqa: F401  (before the stubs: it probes for timm itself)

    for name in ("timm", "timm.models", "timm.models.hub"):
        _stub(name)
    _stub("omegaconf", OmegaConf=object)
    _stub("lavis.common.registry", registry=_Registry())
    _stub("lavis.common.utils", is_url=lambda _s: False, get_abs_path=lambda p: p)
    _stub("lavis.common.logger", MetricLogger=object)
    _stub("lavis.models.eva_vit", create_eva_vit_g=None, convert_weights_to_fp16=None)
    _stub("lavis.models.clip_vit", create_clip_vit_L=None)

    import torch
    import torch.distributed as dist
    from lavis.models.blip2_models import blip2, blip2_qformer
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
    from transformers import BatchEncoding

    data = torch.load(work / "inputs.pt", weights_only=True)
    cfg = data["config"]
    dist.init_process_group("gloo", init_method=f"file://{work / 'pg'}", rank=0, world_size=1)

    class Tokenizer:
        bos_token_id = cfg["bos_token_id"]
        pad_token_id = cfg["pad_token_id"]

        def __len__(self) -> int:
            return cfg["bert"]["vocab_size"]

        def __call__(self, texts: list[str], **_: Any) -> BatchEncoding:
            assert len(texts) == data["input_ids"].shape[0]
            return BatchEncoding({"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]})

    def init_vision_encoder(self: Any, *_: Any) -> tuple[Any, Any]:
        encoder = torch.nn.Identity()
        encoder.num_features = cfg["vision_width"]
        return encoder, blip2.LayerNorm(encoder.num_features)

    blip2.Blip2Base.init_tokenizer = classmethod(lambda cls, truncation_side="right": Tokenizer())
    blip2_qformer.Blip2Qformer.init_vision_encoder = init_vision_encoder
    blip2.BertConfig.from_pretrained = classmethod(lambda cls, _name: BertConfig(**cfg["bert"]))
    blip2.BertLMHeadModel.from_pretrained = classmethod(lambda cls, _name, config: BertLMHeadModel(config))

    model = blip2_qformer.Blip2Qformer(
        num_query_token=cfg["num_query_token"],
        cross_attention_freq=cfg["cross_attention_freq"],
        embed_dim=cfg["embed_dim"],
        max_txt_len=data["input_ids"].shape[1],
    )
    result = model.load_state_dict(data["state"], strict=False)
    # not in our file: the position-id buffer and parameters tied to one that is (BERT's decoder bias)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in data["state"] if k in params}
    missing = [k for k in result.missing_keys if not k.endswith("position_ids") and id(params.get(k)) not in loaded]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)

    negatives = [int(i) for i in data["neg_image"]] + [int(i) for i in data["neg_text"]]
    drawn_weights: list[float] = []

    def replay(weights: torch.Tensor, _n: int) -> torch.Tensor:
        index = negatives.pop(0)
        drawn_weights.append(float(weights[index]))  # LAVIS's probability of the replayed negative
        return torch.tensor([index])

    torch.multinomial = replay
    dtype = data["image_features"].dtype
    if dtype == torch.float64:
        blip2.LayerNorm.forward = torch.nn.LayerNorm.forward
    model.to(dtype).train()
    out = model({"image": data["image_features"], "text_input": [""] * data["input_ids"].shape[0]})
    out.loss.backward()
    assert not negatives, "LAVIS drew fewer negatives than were given"
    torch.save(
        {
            "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None},
            "no_grad": [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None],
            "losses": {k: float(getattr(out, k)) for k in ("loss", "loss_itc", "loss_itm", "loss_lm")},
            "negative_weights": drawn_weights,
        },
        work / "lavis.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
