"""LVFace's headline model (its Table 1, first on MFR-Ongoing): a ViT-L on WebFace42M, the two-stage
curriculum of lvface_vit.py at the large size.

ViT-L is insightface's `vit_l_dp005_mask_005` (width 768, depth 24, 8 heads, 9x9 patches, drop path and
patch mask 0.05), which LVFace says it uses. The paper ran 64 GPUs; the per-rank batch of 384 and
sample_rate 0.3 are insightface's 64-GPU WebFace42M ViT-L config (wf42m_pfc03_40epoch_64gpu_vit_l.py).
Stage NCS for epochs 0-40 (ArcFace s=64 m=0.5, Partial FC at sample_rate), stage EPL for 40-100; AdamW
with weight decay 0.1 (the paper), lr 1e-3 and a tenth of the epochs of warmup (insightface's config).

    python -m pipeline pack WEBFACE42M_SRC --out DATA
    torchrun --nnodes=8 --nproc_per_node=8 ... trainer/main.py --config trainer/configs/lvface_vit_l.py --data DATA
"""
from trainer.config import Config

config = Config()
config.mode = "lvface"
config.network = "vit_l"
config.embedding_size = 512
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace
config.scale = 64.0
config.sample_rate = 0.3  # NCS stage only; the EPL stage uses every class
config.lvface_switch_epoch = 40.0
config.lvface_epl_alpha = 0.5
config.lvface_epl_momentum = 0.9
config.optimizer = "adamw"
config.lr = 1e-3
config.weight_decay = 0.1
config.num_epoch = 100
config.warmup_epoch = 10.0
config.lr_schedule = "cosine"
config.batch_size = 384
config.amp = "bf16"
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
