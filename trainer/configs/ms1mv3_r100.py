"""insightface arcface_torch's MS1MV3 IResNet-100 ArcFace recipe: the r50 recipe with the deeper backbone."""
from trainer.config import Config

config = Config()
config.network = "r100"
config.embedding_size = 512
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace s=64, m=0.5
config.sample_rate = 1.0
config.amp = "fp16"
config.channels_last = True  # NHWC convolutions: tensor cores without layout transposes (cudnn_benchmark, tf32: on in base.py)
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.num_epoch = 20
config.warmup_epoch = 0.0
config.verbose = 2000
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
