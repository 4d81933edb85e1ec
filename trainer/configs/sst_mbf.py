"""Semi-Siamese Training (ECCV 2020) for shallow data (about two images per identity), on a MobileFaceNet.

No classifier: a probe network is trained against a queue of prototypes from its moving average (the
gallery network); each step takes two images of every identity of the batch (trainer/modes/sst.py).

    python -m pipeline pack SHALLOW_SRC --out DATA
    .venv/bin/python -m torch.distributed.run --nproc_per_node=4 trainer/main.py \
        --config trainer/configs/sst_mbf.py --data DATA
"""
from trainer.config import Config

config = Config()
config.mode = "sst"
config.network = "mbf"
config.embedding_size = 512
config.sst_queue_size = 16384  # a multiple of the global batch (128 x ranks)
config.sst_scale = 30.0
config.sst_loss_type = "softmax"
config.sst_margin = 0.0
config.sst_alpha = 0.999
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.num_epoch = 250  # an epoch is one pair per identity: short
config.warmup_epoch = 5.0
config.batch_size = 128
config.val_targets = ["lfw"]
