"""Classification heads on Partial FC's sharded cosine logits: one package, one registry.

`build_head(name, **kwargs)` builds any registered head; the trainer builds `config.loss` with
`build_margin_loss(cfg, num_classes)`. Registered: insightface's margins ("combined", the default, from
`margin_list`; "arcface", "cosface"; defined in trainer.losses, registered in heads/margins.py), and
FaceX-Zoo's heads with AdaFace (heads/facex_zoo.py), and a plain linear classifier W x + b ("linear",
heads/linear.py). A new head is a class decorated with
`@register_head("name")` in a module imported here.

Calling convention (the same as `trainer.losses`, docs/design.md section 4): a head maps this rank's cosine
logits `[B, C_local]` (rows: the batch gathered over all ranks; columns: this rank's classes) and
`labels [B]` (the column of the sample's class, or -1 when the class lives on another rank) to the
logits that go into Partial FC's distributed softmax cross-entropy.

Extra interface for Partial FC (optional attributes, read with getattr and a default):
- `needs_norms = True`: forward takes `norms=` the L2 norms `[B]` of the gathered, un-normalised
  embeddings (AdaFace, MagFace). MagFace differentiates through them; AdaFace detaches them.
- `needs_class_index = True`: forward takes `class_index=` the local class rows `[C_local]` that the
  columns are (Partial FC with sample_rate < 1), or None when the columns are all local classes in
  order (AdaM-Softmax, whose per-class margins are indexed by class).
- A head with a regulariser (AdaM-Softmax, MagFace) returns `(logits, extra)`: `extra` is a scalar
  loss term with the same value on every rank, built from gathered (or differentiably all-reduced)
  quantities; Partial FC adds it once and divides its gradient by the world size, since every rank
  back-propagates its own copy.
- `needs_raw_logits = True`: Partial FC passes `x @ W.T` (the raw embedding against the raw rows) in place
  of the cosines (the linear head).
- `per_class_state`: names of parameters/buffers whose dim 0 is this rank's classes; a checkpoint
  gathers and re-shards them exactly like Partial FC's weight.
"""
import importlib

from trainer.heads.registry import Head, available_heads, build_head, build_margin_loss, register_head

for _module in ("margins", "facex_zoo", "linear"):  # importing a module runs its @register_head decorators
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Head", "available_heads", "build_head", "build_margin_loss", "register_head"]
