"""A smoke run of the whole chain on the CPU: glint24 (24 identities) packed with `--holdout 5`, 2 ranks.

    python -m pipeline pack ../shared/data/glint24 --out DATA --holdout 5
    maskgen build --ratio 0.05 --data DATA          # optional: adds 5% masked copies
    .venv/bin/python -m torch.distributed.run --nproc_per_node=2 trainer/main.py \
        --config trainer/configs/cpu_demo.py --data DATA

It trains a small MobileFaceNet (56x56 input, local contrast normalisation) with CosFace and verifies at
the end on DATA/holdout_pairs.bin (pairs of held-out images, never trained on). Measured figures:
bench/RESULTS.md.
"""
from trainer.config import Config

config = Config()
config.network = "mbf"
config.network_kwargs = {"scale": 1, "units": (1, 2, 3, 1), "resolution": 56, "input_norm": "lcn"}
config.channels_last = True
config.embedding_size = 128
config.margin_list = (1.0, 0.0, 0.35)  # CosFace
config.scale = 32.0
config.batch_size = 32
config.optimizer = "sgd"
config.lr = 0.1
config.weight_decay = 5e-4
config.num_epoch = 45
config.warmup_epoch = 1.0
config.lr_schedule = "cosine"
config.augment = {"flip": True}
config.amp = "fp32"
config.num_threads = 1  # one decoding worker per rank: the 2 cores are for the two ranks' compute
config.frequent = 5
config.verbose = 100000  # verify at the end only
config.save_every = 0
config.val_targets = ["holdout_pairs.bin"]
config.val_batch_size = 64
