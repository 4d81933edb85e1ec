"""LVFace (ICCV 2025) on a ViT-B: its two-stage curriculum, 100 epochs, the switch at epoch 40.

Stage NCS (epochs 0-40): ArcFace s=64 m=0.5 through Partial FC with negative class sub-sampling
(`sample_rate`). Stage EPL (epochs 40-100): every negative, and each class centre mixed with the running
mean of its class's features (trainer/modes/lvface.py). AdamW, weight decay 0.1.

    python -m pipeline pack WEBFACE_SRC --out DATA
    .venv/bin/python -m torch.distributed.run --nproc_per_node=8 trainer/main.py \
        --config trainer/configs/lvface_vit.py --data DATA
"""
from trainer.config import Config

config = Config()
config.mode = "lvface"
config.network = "vit_b"
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
config.warmup_epoch = 4.0
config.lr_schedule = "cosine"
config.batch_size = 128
config.amp = "bf16"
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
