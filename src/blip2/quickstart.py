"""`python -m blip2.quickstart`: build a tiny random BLIP-2, caption a generated image, print the result.

It shows the whole path (image → frozen encoder → Q-Former → LLM → text) with no download; the words are
random because the weights are. `blip2 demo` trains a real small model offline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from blip2.cli import main


def run() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        image = Image.new("RGB", (224, 224), (128, 128, 128))
        ImageDraw.Draw(image).ellipse((40, 40, 120, 120), fill=(220, 30, 30))
        image_path = Path(tmp) / "circle.png"
        image.save(image_path)
        from blip2.testing import make_tiny_model

        make_tiny_model(Path(tmp) / "model", llm="opt")
        return main(["caption", str(image_path), "--model", str(Path(tmp) / "model"), "--max-new-tokens", "8"])


if __name__ == "__main__":
    raise SystemExit(run())
