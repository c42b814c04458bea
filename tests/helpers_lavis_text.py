"""LAVIS's caption and question cleaning on a list of strings, for test_lavis_parity.py.

Runs in the LAVIS interpreter; imports ``lavis/processors/blip_processors.py`` alone (its registry, base class,
RandAugment, omegaconf and torchvision imports are stubbed: the text processors use none of them).
usage: python helpers_lavis_text.py LAVIS_SRC IN.json OUT.json   (OUT: {"caption": [...], "question": [...]})
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any


class _Registry:
    @staticmethod
    def register_processor(_name: str) -> Any:
        return lambda cls: cls


def main() -> None:
    src, inp, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    stubs: dict[str, dict[str, Any]] = {
        "lavis.common.registry": {"registry": _Registry()},
        "lavis.processors.base_processor": {"BaseProcessor": object},
        "lavis.processors.randaugment": {"RandomAugment": object},
        "omegaconf": {"OmegaConf": object},
        "torchvision": {"transforms": None},
        "torchvision.transforms": {},
        "torchvision.transforms.functional": {"InterpolationMode": None},
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    path = src / "lavis" / "processors" / "blip_processors.py"
    spec = importlib.util.spec_from_file_location("blip_processors", path)
    assert spec is not None and spec.loader is not None
    processors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(processors)
    caption, question = processors.BlipCaptionProcessor(), processors.BlipQuestionProcessor()
    texts = json.loads(inp.read_text())
    out.write_text(json.dumps({"caption": [caption(t) for t in texts], "question": [question(t) for t in texts]}))


if __name__ == "__main__":
    main()
