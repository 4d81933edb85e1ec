"""A small backbone on the CPU: glint24 (24 identities) packed with `--holdout 5`, 2 ranks, < 10 minutes.

    python -m pipeline pack ../shared/data/glint24 --out DATA --holdout 5
    maskgen build --ratio 0.05 --data DATA          # optional: the demo adds 5% masked copies
    .venv/bin/python -m torch.distributed.run --nproc_per_node=2 trainer/main.py \
        --config trainer/configs/cpu_demo.py --data DATA

Verifies on DATA/holdout_pairs.bin: pairs of held-out images of the same people, never trained on.

Why these settings (tuning runs on 2 CPU cores, bench/RESULTS.md): 822 training images overfit any
network long before the time is up (the training loss reaches ~0), so the run spends its minutes on
epochs rather than on pixels: a narrow MobileFaceNet that sees the crop at 56x56 (2x2 area average)
runs ~2.5x faster than at 112x112 and verifies as well or better. Random crops and colour jitter cost
accuracy here; CosFace trains from scratch on few identities where ArcFace stalls. Local contrast
normalisation of the input (`input_norm="lcn"`) keeps the network from telling people apart by print tint
and lighting: held-out verification 0.856-0.892 over 4 seeds (mean 0.878) against 0.80-0.88 without it.
A seed's figure depends on the CPU (its float rounding, amplified over the steps): on another 2-core
machine the same 4 seeds gave 0.833-0.888 (mean 0.867). The goal of 0.90 is not reached.
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
