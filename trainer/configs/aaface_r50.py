"""AAFace (ICIP 2023) as published (sections 2-3): the convolutional layers of a ResNet-50 started from trained
weights and frozen, an FR and a soft-biometric branch of two convolutions + GAP each (sharing the first), fused
by the AAI module (r = 8); AdaFace for L_FR, BCE per attribute; lambda_FR = 3 and the paper's five CelebA
attributes with their weights (the mode's defaults); trained in three stages (FR branch alone, SB branch
alone, then jointly) for 25 epochs of SGD, lr 0.01, divided by ten at epochs 4, 10 and 17.

CelebA's attributes are packed from its own annotation file; the identities from a list file:

    python -m pipeline pack identity_list.tsv --out DATA --attributes Anno/list_attr_celeba.txt
    .venv/bin/python -m torch.distributed.run --nproc_per_node=8 trainer/main.py \
        --config trainer/configs/aaface_r50.py --data DATA init_weights=ms1mv3_arcface_r50/backbone.pth

`init_weights` is required (the backbone is frozen): the paper starts from a ResNet-50 trained on VGGFace2;
insightface's released IResNet-50 (same parameter names as ours) is the closest published weights here.
The stage lengths are this config's choice (the paper gives none): the stages start at the schedule's
milestones 4 and 10, so that each stage begins with a rate the previous one did not use up.
"""
from trainer.config import Config

config = Config()
config.mode = "aaface"
config.network = "aaface"
config.network_kwargs = {"base": "r50", "branch_channels": 512, "reduction": 8}
config.embedding_size = 512
config.loss = "adaface"
config.loss_kwargs = {"s": 64.0, "m": 0.4, "h": 0.333}
config.aaface_stage_epochs = (4.0, 6.0, 15.0)
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
