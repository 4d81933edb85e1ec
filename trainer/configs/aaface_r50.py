"""AAFace (ICIP 2023): an IResNet-50 split after layer2 into a face-recognition branch and a soft-biometric
branch of binary attribute classifiers, fused by the AAI module; AdaFace for L_FR, weighted BCE per
attribute; trained in three stages (FR branch alone, SB branch alone, then jointly).

The attributes are named in the packed data's `label_fields`: `masked` comes from maskgen, others from an
attribute file packed alongside the images:

    python -m pipeline pack SRC --out DATA [--attributes ATTRS.tsv]
    maskgen build --ratio 0.05 --data DATA
    .venv/bin/python -m torch.distributed.run --nproc_per_node=8 trainer/main.py \
        --config trainer/configs/aaface_r50.py --data DATA \
        'aaface_attributes=["masked"]'

Schedule as the paper gives it: 25 epochs of SGD, lr 0.01, divided by ten at epochs 4, 10 and 17. The stage
lengths are this config's choice (the paper gives no epoch split we could confirm); they add up to the 25.
"""
from trainer.config import Config

config = Config()
config.mode = "aaface"
config.network = "aaface"
config.network_kwargs = {"base": "r50", "split_after": "layer2", "reduction": 8}
config.embedding_size = 512
config.loss = "adaface"
config.loss_kwargs = {"s": 64.0, "m": 0.4, "h": 0.333}
config.aaface_attributes = ["masked"]
config.aaface_lambdas = [1.0]
config.aaface_lambda_fr = 1.0
config.aaface_pos_weight = [19.0]  # 5% masked copies: #negatives / #positives
config.aaface_stage_epochs = (15.0, 4.0, 6.0)
config.num_epoch = 25
config.optimizer = "sgd"
config.lr = 0.01
config.lr_schedule = "step"
config.lr_steps = (4, 10, 17)
config.lr_gamma = 0.1
config.weight_decay = 5e-4
config.batch_size = 128
config.amp = "bf16"
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
