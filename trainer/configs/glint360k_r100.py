"""insightface arcface_torch's Glint360K IResNet-100 CosFace recipe (360,232 identities, 17,091,657 images).

CosFace m=0.4 and a smaller weight decay than the MS1MV3 recipes.
"""
from trainer.config import Config

config = Config()
config.network = "r100"
config.embedding_size = 512
config.margin_list = (1.0, 0.0, 0.4)  # CosFace s=64, m=0.4
config.sample_rate = 1.0
config.amp = "fp16"
config.channels_last = True  # NHWC convolutions: tensor cores without layout transposes (cudnn_benchmark, tf32: on in base.py)
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 1e-4
config.num_epoch = 20
config.warmup_epoch = 0.0
config.verbose = 2000
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
