"""A small backbone on the CPU: glint24 (24 identities) packed with `--holdout 5`, 2 ranks, < 10 minutes.

    python -m pipeline pack ../shared/data/glint24 --out DATA --holdout 5
    torchrun --nproc_per_node=2 trainer/main.py --config trainer/configs/cpu_demo.py --data DATA

Verifies on DATA/holdout_pairs.bin: pairs of held-out images of the same people, never trained on.
"""
from trainer.config import Config

config = Config()
config.network = "mbf"
config.embedding_size = 128
config.margin_list = (1.0, 0.0, 0.35)  # CosFace: trains from scratch on few identities where ArcFace stalls
config.scale = 32.0
config.batch_size = 32
config.optimizer = "sgd"
config.lr = 0.1
config.weight_decay = 5e-4
config.num_epoch = 30
config.warmup_epoch = 1.0
config.lr_schedule = "cosine"
config.augment = {"flip": True}
config.amp = "fp32"
config.frequent = 5
config.verbose = 100000  # verify at the end only
config.save_every = 0
config.val_targets = ["holdout_pairs.bin"]
config.val_batch_size = 64
