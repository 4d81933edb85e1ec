"""The markdown table `python -m trainer.eval --table` writes: one row per checkpoint (and subset)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from trainer.eval.common import far_key


def _percent(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def results_table(results: Sequence[dict], fars: Sequence[float]) -> str:
    """A markdown table: one row per checkpoint (and subset), accuracy and TAR@FAR in percent."""
    keys = [far_key(f) for f in fars]
    with_cmc = any("rank1" in r or any("rank1" in s for s in r.get("subsets", {}).values()) for r in results)
    head = ["checkpoint", "set", "pairs", "acc ± std (%)"] + [f"TAR@FAR={k} (%)" for k in keys]
    head += ["rank-1 (%)"] if with_cmc else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in results:
        rows = [(r.get("target", "pairs"), r)] if "subsets" not in r else list(r["subsets"].items())
        for name, s in rows:
            cells = [r["checkpoint"], name, str(s["pairs"]), f"{_percent(s['acc'])} ± {_percent(s['std'])}"]
            cells += [_percent(s["tar_at_far"].get(k)) for k in keys]
            cells += [_percent(s.get("rank1"))] if with_cmc else []
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
