"""Scoring a trained backbone, the way the papers do (`python -m trainer.eval`; `python -m
trainer.eval.embed` embeds a folder of images to a .npz).

Protocols, pure numbers in and out: `kfold` (insightface's 10-fold pair accuracy), `tar_far` (TAR at FAR,
and the all-to-all 1:1 protocol in tiles), `identification` (rank-K CMC, MegaFace), sharing `common`.
Inputs: `targets` (.bin packs and pairs.txt lists), `images` (reading and aligning one face), `folder`
(a folder of images, .npz files). `embedding` turns images into flip-test embeddings; `pairs` scores a
verification set (what the trainer runs during training), `packed` a packed labelled set; `report` and
`plots` write the table and figures.
"""
