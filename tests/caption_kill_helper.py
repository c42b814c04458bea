"""Run a dataset captioning job whose ``STALL``-th generate call touches ``MARKER`` and hangs: the test kills
the process with SIGKILL there, in the middle of a batch.

    python caption_kill_helper.py MODEL INPUT OUTPUT STALL MARKER
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from blip2.caption import CaptionSettings
from blip2.caption.job import CaptionJob, run_job
from blip2.model import Blip2

SETTINGS = CaptionSettings(batch_size=2, workers=1, generation={"num_beams": 2, "max_new_tokens": 4}, progress=False)


def main() -> None:
    model, source, output, stall, marker = sys.argv[1:6]
    original = Blip2.generate
    calls = 0

    def generate(self: Blip2, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == int(stall):
            Path(marker).touch()
            time.sleep(120)
        return original(self, *args, **kwargs)

    Blip2.generate = generate  # type: ignore[method-assign]
    run_job(CaptionJob(input=source, model=model, output=output, settings=SETTINGS))


if __name__ == "__main__":
    main()
