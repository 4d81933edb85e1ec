"""Training modes of the papers, beside the plain `backbone -> Partial FC -> margin head` recipe.

- `lvface`: LVFace's two-stage curriculum. `build_lvface_partial_fc(...)` replaces `PartialFC(...)`;
  before each step `LVFaceCurriculum(switch_epoch, ncs_sample_rate).apply(partial_fc, step / steps_per_epoch)`
  sets negative sub-sampling (stage "ncs") or the class-mean-stabilised centres with sampling off ("epl").
- `aaface`: AAFace. The backbone "aaface" (FR + soft-biometric branches fused by the AAI module); the
  loader yields label vectors (`return_label_vectors=True`); `AAFaceSchedule(fr_epochs, sb_epochs).apply(
  backbone, epoch)` sets the stage (re-wrap DDP when it returns True); a step's loss is
  `AAFaceObjective(attributes, loader.label_fields)(ddp_backbone, partial_fc, images, labels, vectors)`.
- `sst`: Semi-Siamese Training for shallow data. No Partial FC: `IdentityPairLoader` gives
  `(images1, images2, ids)`, `SemiSiameseTraining(backbone, ...)` gives the loss of a step, and
  `momentum_update(backbone)` follows each optimizer step.
"""
