"""FaceX-Zoo's backbone comparison (its Table 1): every backbone trained the same way on MS-Celeb-1M-v1c.

MV-Softmax head (AM margin 0.35, t 1.12, s 32, FaceX-Zoo's head_conf.yaml), SGD momentum 0.9, weight decay
1e-4 (its conventional_training/train.py), 18 epochs, batch 512 (4 GPUs x 128), lr 0.1 divided by ten at
epochs 10, 13 and 16. The default backbone is FaceX-Zoo's MobileFaceNet (`mbf_facexzoo`, 1x wide); the
table's other rows swap `network`:

    python -m pipeline pack MS1M_V1C_SRC --out DATA
    torchrun --nproc_per_node=4 trainer/main.py --config trainer/configs/facex_zoo_backbones.py --data DATA
    ... network=ir_se152 dropout=0.4        # ResNet152-irse (FaceX-Zoo's drop_ratio for its ResNets)
    ... network=tf_nas_a dropout=0.2        # TF-NAS-A
    ... network=r50 dropout=0.4             # ResNet50-ir
"""
from trainer.config import Config

config = Config()
config.network = "mbf_facexzoo"
config.embedding_size = 512
config.loss = "mv_softmax"
config.loss_kwargs = {"s": 32.0, "m": 0.35, "t": 1.12, "is_am": True}
config.sample_rate = 1.0
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 1e-4  # FaceX-Zoo's conventional training (SST's uses 5e-4)
config.clip_grad_norm = 0.0  # FaceX-Zoo does not clip
config.num_epoch = 18
config.warmup_epoch = 0.0
config.lr_schedule = "step"
config.lr_steps = (10, 13, 16)
config.lr_gamma = 0.1
config.batch_size = 128  # per rank: 512 on 4 GPUs, as the paper
config.val_targets = ["lfw", "cplfw", "calfw", "agedb_30"]
