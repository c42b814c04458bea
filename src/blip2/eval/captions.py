"""COCO caption metrics: BLEU-1..4 and CIDEr in-process, METEOR and SPICE through pycocoevalcap's Java scorers.

`caption_metrics` scores predictions against references. Captions are tokenised like the official COCO
evaluation (Stanford PTBTokenizer, run with `java`) or, without Java, by `simple_tokenize`. The Java scorers
run in a child process killed after a timeout, so a stuck JVM cannot hang an evaluation. Scores are the raw
pycocoevalcap values.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# PTB tokens that the COCO caption evaluation drops after tokenising.
_PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-lrb-",
    "-rrb-",
    "-lcb-",
    "-rcb-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


def _pycocoevalcap_dir() -> Path | None:
    try:
        from pycocoevalcap.bleu import bleu  # noqa: F401  (namespace package: locate it through a module)
    except ImportError:
        return None
    return Path(bleu.__file__).resolve().parent.parent


def simple_tokenize(text: str) -> str:
    """Fallback for the Java PTB tokenizer: lowercase, split off punctuation, drop it, keep contractions."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def ptb_tokenize(texts: Sequence[str], timeout_s: float = 60.0) -> list[str]:
    """Tokenise like the COCO caption evaluation (Stanford PTBTokenizer, lowercased, punctuation removed).

    Needs `java` and pycocoevalcap's bundled CoreNLP jar; raises RuntimeError when either is missing or the
    tokenizer fails, so callers can fall back to `simple_tokenize`.
    """
    package = _pycocoevalcap_dir()
    jar = package / "tokenizer" / "stanford-corenlp-3.4.1.jar" if package else None
    if shutil.which("java") is None or jar is None or not jar.exists():
        raise RuntimeError("PTB tokenizer needs `java` on PATH and pycocoevalcap installed")
    lines = [t.replace("\n", " ").replace("\r", " ") for t in texts]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(lines))
    try:
        proc = subprocess.run(
            ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", f.name],
            capture_output=True,
            timeout=timeout_s,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as e:
        raise RuntimeError(f"PTB tokenizer failed: {e}") from e
    finally:
        os.unlink(f.name)
    out = proc.stdout.decode("utf-8").split("\n")[: len(lines)]
    if len(out) != len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in _PTB_PUNCTUATION) for line in out]


# Runs METEOR or SPICE in a child process so that a stuck Java scorer can be killed after a timeout.
_JAVA_METRIC_SCRIPT = """
import json, sys
job = json.load(sys.stdin)
if job["metric"] == "METEOR":
    from pycocoevalcap.meteor.meteor import Meteor as Scorer
else:
    from pycocoevalcap.spice.spice import Spice as Scorer
score, _ = Scorer().compute_score(job["gts"], job["res"])
json.dump({"score": float(score)}, sys.stdout)
"""


def _run_java_metric(metric: str, gts: dict[str, list[str]], res: dict[str, list[str]], timeout_s: float) -> float:
    proc = subprocess.Popen(
        [sys.executable, "-c", _JAVA_METRIC_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so the Java grandchild dies with it
    )
    try:
        stdout, stderr = proc.communicate(
            json.dumps({"metric": metric, "gts": gts, "res": res}).encode(), timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.communicate()
        raise RuntimeError(f"{metric} did not finish within {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no error output"]
        raise RuntimeError(f"{metric} failed (exit {proc.returncode}): {tail[0]}")
    return float(json.loads(stdout)["score"])


def _spice_ready(package: Path) -> str | None:
    """Why SPICE cannot run offline, or None. pycocoevalcap would download CoreNLP on first use; we never do."""
    lib = package / "spice" / "lib"
    missing = [j for j in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar") if not (lib / j).exists()]
    if missing:
        return (
            f"needs {', '.join(missing)} in {lib} (run pycocoevalcap's spice/get_stanford_models.py "
            "with internet access once)"
        )
    return None


def _tokenized(
    predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]], java_timeout_s: float
) -> tuple[dict[str, list[str]], dict[str, list[str]], str]:
    """(references, predictions) tokenised as pycocoevalcap wants them, keyed by the image id as a string (the
    Java scorers exchange them through JSON), and which tokenizer ran ("ptb", or "simple: why")."""
    ids = list(predictions)
    texts = [predictions[i] for i in ids] + [r for i in ids for r in references[i]]
    try:
        tokens = ptb_tokenize(texts, timeout_s=java_timeout_s)
        tokenizer = "ptb"
    except RuntimeError as e:
        tokens = [simple_tokenize(t) for t in texts]
        tokenizer = f"simple: {e}"
    res = {str(i): [tokens[n]] for n, i in enumerate(ids)}
    gts: dict[str, list[str]] = {}
    offset = len(ids)
    for i in ids:
        n_refs = len(references[i])
        gts[str(i)] = tokens[offset : offset + n_refs]
        offset += n_refs
    return gts, res, tokenizer


def caption_metrics(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    metrics: Sequence[str] = ("BLEU", "CIDEr", "METEOR", "SPICE"),
    java_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """COCO caption metrics of `predictions` (image id → caption) against `references` (id → captions).

    Scores every id in `predictions`; each must have references. BLEU-1..4 and CIDEr(-D) come from
    pycocoevalcap in-process; METEOR and SPICE run its Java scorers in a child process killed after
    `java_timeout_s`. Captions are tokenised with the PTB tokenizer when Java works, else with
    `simple_tokenize` (scores then differ slightly from the official ones). The result holds the scores
    plus `computed` (metric names), `skipped` (metric → reason) and `tokenizer` ("ptb" or "simple: why").
    CIDEr's document frequencies come from the evaluated references, so score a few images at least.
    """
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"{len(missing)} predicted images have no references (e.g. image id {missing[0]!r})")
    wanted = {m.upper() for m in metrics}
    unknown = wanted - {"BLEU", "CIDER", "METEOR", "SPICE"}
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; choose from BLEU, CIDEr, METEOR, SPICE")
    result: dict[str, Any] = {"computed": [], "skipped": {}}
    package = _pycocoevalcap_dir()
    if package is None:
        result["skipped"] = {m: "pycocoevalcap is not installed (pip install pycocoevalcap)" for m in metrics}
        result["tokenizer"] = "none"
        return result

    gts, res, result["tokenizer"] = _tokenized(predictions, references, java_timeout_s)
    if "BLEU" in wanted:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        result.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
        result["computed"].append("BLEU")
    if "CIDER" in wanted:
        from pycocoevalcap.cider.cider import Cider

        result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        result["computed"].append("CIDEr")
    for name in ("METEOR", "SPICE"):
        if name not in wanted:
            continue
        reason = "`java` not found on PATH" if shutil.which("java") is None else None
        if reason is None and name == "SPICE":
            reason = _spice_ready(package)
        if reason is None:
            try:
                result[name] = _run_java_metric(name, gts, res, java_timeout_s)
                result["computed"].append(name)
            except (RuntimeError, ValueError, OSError) as e:
                reason = str(e)
        if reason is not None:
            result["skipped"][name] = reason
    return result
