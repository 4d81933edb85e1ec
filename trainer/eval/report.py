"""The markdown table `python -m trainer.eval --table` writes: one row per checkpoint (and subset)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from trainer.eval.common import far_key


def _percent(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def results_table(results: Sequence[dict], fars: Sequence[float], headline_far: float = 1e-3) -> str:
    """A markdown table: one row per checkpoint (and subset). First the numbers an imbalanced set cannot
    inflate, beside the counts of genuine and impostor pairs: TAR at `headline_far` and the balanced
    accuracy; then the plain accuracy after the accuracy of always giving the commoner answer."""
    head_key = far_key(headline_far)
    keys = [k for k in (far_key(f) for f in fars) if k != head_key]
    with_cmc = any("rank1" in r or any("rank1" in s for s in r.get("subsets", {}).values()) for r in results)
    head = ["checkpoint", "set", "genuine", "impostor", f"TAR@FAR={head_key} (%)", "balanced acc (%)",
            "acc ± std (%)", "majority (%)"] + [f"TAR@FAR={k} (%)" for k in keys]
    head += ["rank-1 (%)"] if with_cmc else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in results:
        if "subsets" in r:
            prefix = r.get("target")
            rows = [(f"{prefix} {n}" if prefix else n, s) for n, s in r["subsets"].items()]
        else:
            rows = [(r.get("target") or r.get("set") or "pairs", r)]
        for name, s in rows:
            cells = [r["checkpoint"], name, str(s["genuine"]), str(s["impostor"]),
                     _percent(s["tar_at_far"].get(head_key)), _percent(s.get("balanced_acc")),
                     f"{_percent(s['acc'])} ± {_percent(s['std'])}", _percent(s.get("majority_acc"))]
            cells += [_percent(s["tar_at_far"].get(k)) for k in keys]
            cells += [_percent(s.get("rank1"))] if with_cmc else []
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
