"""The frozen-feature cache: run the frozen image encoder once per image, train from its outputs.

The image encoder is frozen and (without augmentation) sees the same pixels every epoch, so its outputs
(B, P, Dv) — everything before ``ln_vision``, which is trainable — can be computed once and read back.
For stage 1 with a ViT-g this removes by far the largest cost of a training step.

Layout of a cache directory: ``features.safetensors`` (one (N, P, Dv) tensor, N = distinct images) and
``meta.json`` (the image paths in order, the encoder config and a fingerprint used to refuse a stale cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from blip2.data.images import ImageError, load_image
from blip2.data.transforms import ImageProcessor


def encoder_fingerprint(encoder: nn.Module, extra: dict[str, Any]) -> str:
    """A hash of the encoder's weights (a sample of them) and the preprocessing: a stale cache is refused."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name, p in sorted(encoder.state_dict().items()):
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def build_feature_cache(
    encoder: nn.Module,
    image_paths: Sequence[str | os.PathLike[str]],
    processor: ImageProcessor,
    directory: str | os.PathLike[str],
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    reuse_only: bool = False,
) -> torch.Tensor:
    """Encode every image once (eval preprocessing) and store the features; reuse a matching cache.

    Unreadable images get all-zero features and are listed in ``meta.json["bad_images"]``; datasets built
    on the cache skip them. ``reuse_only``: load a matching cache or raise, never write (the other ranks of
    a multi-process run read the cache rank 0 wrote). Returns the (N, P, Dv) features.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    fingerprint = encoder_fingerprint(
        encoder,
        {
            "size": processor.image_size,
            "mean": [float(x) for x in processor.mean],
            "std": [float(x) for x in processor.std],
            "dtype": str(dtype),
        },
    )
    paths = [str(p) for p in image_paths]
    meta_file = out / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") == fingerprint and meta.get("images") == paths:
            return read_feature_cache(out)[0]
    if reuse_only:
        raise RuntimeError(
            f"the feature cache in {out} does not match this image encoder and image list (another "
            "process wrote it for different weights, preprocessing or images)"
        )
    out.mkdir(parents=True, exist_ok=True)
    encoder.to(device)  # in place: the frozen encoder runs where the images are sent
    features, bad = encode_images(encoder, paths, processor, batch_size, dtype, device)  # (N, P, Dv)
    tmp = out / "features.safetensors.tmp"
    save_file({"features": features.contiguous()}, str(tmp))
    os.replace(tmp, out / "features.safetensors")
    tmp_meta = out / "meta.json.tmp"
    tmp_meta.write_text(json.dumps({"fingerprint": fingerprint, "images": paths, "bad_images": bad}))
    os.replace(tmp_meta, meta_file)
    return features


@torch.no_grad()
def encode_images(
    encoder: nn.Module,
    paths: list[str],
    processor: ImageProcessor,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, list[str]]:
    """The encoder's features of every image (N, P, Dv), zeros for unreadable ones, and those images' paths
    (in memory; `build_feature_cache` writes them to a cache directory)."""
    encoder.eval()
    chunks: list[torch.Tensor] = []
    bad: list[str] = []
    for start in tqdm(range(0, len(paths), batch_size), desc="caching frozen image features", unit="batch"):
        images, ok = [], []
        for p in paths[start : start + batch_size]:
            try:
                images.append(load_image(p))
                ok.append(True)
            except ImageError:
                images.append(None)
                ok.append(False)
                bad.append(p)
        good = [im for im in images if im is not None]
        feats = encoder(processor(good).to(device)).to(dtype).cpu() if good else None  # (b, P, Dv)
        rows, k = [], 0
        for flag in ok:
            if flag:
                rows.append(feats[k])  # type: ignore[index]
                k += 1
            else:
                rows.append(None)
        template = next((r for r in rows if r is not None), None)
        if template is None and chunks:
            template = chunks[0][0]
        if template is None:
            raise ImageError(f"none of the first {len(rows)} images could be read; cannot size the feature cache")
        chunks.append(torch.stack([r if r is not None else torch.zeros_like(template) for r in rows]))
    return torch.cat(chunks), bad


def read_feature_cache(directory: str | os.PathLike[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The (N, P, Dv) features and the ``meta.json`` of a cache `build_feature_cache` wrote (no check of the
    encoder: for a reader that knows the cache is its own)."""
    from safetensors.torch import load_file

    out = Path(directory)
    meta = json.loads((out / "meta.json").read_text())
    return load_file(str(out / "features.safetensors"))["features"], meta


class CachedFeatureDataset(Dataset):
    """Wraps a caption dataset (`ImageTextDataset`, `CocoCaptionsDataset`): items carry the cached frozen
    features (P, Dv) under ``"image"`` instead of a decoded image, with the caption the wrapped dataset would
    give for the same index and epoch (``sample_indices``); the collator stacks them and the training recipe
    passes them to the model as ``image_features``. Items of images listed in ``bad_images`` are None."""

    def __init__(self, dataset: Any, features: torch.Tensor, bad_images: Sequence[str] = ()) -> None:
        if features.shape[0] != len(dataset.images):
            raise ValueError(
                f"the feature cache holds {features.shape[0]} images but the dataset has {len(dataset.images)}"
            )
        self.dataset = dataset
        self.features = features  # (N, P, Dv)
        self.bad = set(bad_images)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image_index, caption_index = self.dataset.sample_indices(index)
        entry = self.dataset.images[image_index]
        if str(self.dataset.image_root / entry.path) in self.bad:
            return None
        return {
            "image": self.features[image_index],
            "text": entry.captions[caption_index],
            "image_id": entry.image_id,
            "captions": entry.captions,
        }


def image_paths_of(dataset: Any) -> list[str]:
    """Full paths of a caption dataset's distinct images, in cache order."""
    return [str(dataset.image_root / entry.path) for entry in dataset.images]
