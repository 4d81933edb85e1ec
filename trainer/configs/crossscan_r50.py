"""The CrossScanViT + ResNet-50 hybrid (the masked-face competition report, section 4.3) with its optimiser
and schedule as published: AdamW, lr 2e-4, weight decay 1e-4, cosine annealing over 60 epochs to 1e-6,
batch 32, random flip and crop, cross-entropy with equal class weights, a 9:1 train/validation split and
early stopping after 20 evaluations without a better validation classification accuracy, keeping the best
weights (trainer/early_stop.py, `early_stop_metric="closed_set"` on the "val" shards of `pack --val-split`;
set `verbose` to one epoch's optimizer steps, #training images / 32, for the report's per-epoch rule). Its
metric, closed-set classification accuracy on held-out images of the training identities:

    python -m pipeline pack SRC --out DATA --holdout 2 --val-split 0.1
    .venv/bin/python -m torch.distributed.run --nproc_per_node=1 trainer/main.py \
        --config trainer/configs/crossscan_r50.py --data DATA verbose=STEPS_PER_EPOCH
    python -m trainer.eval --checkpoint runs/crossscan_r50/model.pt --data DATA --holdout --closed-set

The classifier is the report's: a linear layer with bias, W x + b on the raw embedding (`loss="linear"`,
trainer/heads/linear.py; Partial FC holds W, sharded by rows, with sample_rate 1), trained by softmax
cross-entropy with every class weighted 1, as the report sets nn.CrossEntropyLoss's weights
(`class_weighted_ce=True` weights them by inverse class frequency instead). Where this differs from the
report: the network sees ImageNet-normalised pixels as the report's (`input_norm="imagenet"` re-normalises
the readers' [-1, 1] inside the network, so evaluation and export get the same); the image size is the
pack's (`pack --size 224` for the report's 224x224; the 112x112 default runs the same network); the
report's test set is a split of its own, here the `--holdout K` images per
identity (by count rather than by fraction); the validation split is per identity (stratified), the
report's split is not said to be.
"""
from trainer.config import Config

config = Config()
config.network = "crossscan_r50"
config.network_kwargs = {"input_norm": "imagenet"}
config.embedding_size = 512
config.loss = "linear"
config.class_weighted_ce = False  # the report's weights are all 1
config.optimizer = "adamw"
config.lr = 2e-4
config.weight_decay = 1e-4
config.lr_schedule = "cosine"
config.min_lr = 1e-6
config.num_epoch = 60
config.warmup_epoch = 0.0
config.batch_size = 32
config.augment = {"flip": True, "crop_area": 0.8}  # RandomResizedCrop scale (0.8, 1.0)
config.val_targets = []
config.early_stop_patience = 20
config.early_stop_metric = "closed_set"  # top-1 accuracy on the "val" shards of `pipeline pack --val-split 0.1`
