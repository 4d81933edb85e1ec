"""Semi-Siamese Training (ECCV 2020) for shallow data (about two images per identity), on FaceX-Zoo's
MobileFaceNet, as FaceX-Zoo's section 5.1 runs it on MS-Celeb-1M-v1c-Shallow.

No classifier: a probe network is trained against a queue of prototypes from its moving average (the
gallery network); each step takes two images of every identity of the batch (trainer/modes/sst.py).
The loss is FaceX-Zoo's SST_Prototype as its head_conf.yaml sets it (AM-Softmax, s = 32, m = 0.35; the
class's own default of plain softmax s = 30 is not what it trains with). 250 epochs, batch 512, lr 0.1
divided by ten at epochs 150, 200 and 230 (the paper and its train.sh); no warmup.

    python -m pipeline pack SHALLOW_SRC --out DATA
    .venv/bin/python -m torch.distributed.run --nproc_per_node=4 trainer/main.py \
        --config trainer/configs/sst_mbf.py --data DATA
"""
from trainer.config import Config

config = Config()
config.mode = "sst"
config.network = "mbf_facexzoo"
config.embedding_size = 512
config.sst_queue_size = 16384  # a multiple of the global batch (128 x 4 ranks)
config.sst_scale = 32.0
config.sst_loss_type = "am_softmax"
config.sst_margin = 0.35
config.sst_alpha = 0.999
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.clip_grad_norm = 0.0  # FaceX-Zoo does not clip
config.num_epoch = 250  # an epoch is one pair per identity: short
config.warmup_epoch = 0.0
config.lr_schedule = "step"
config.lr_steps = (150, 200, 230)
config.lr_gamma = 0.1
config.batch_size = 128
config.val_targets = ["lfw"]
