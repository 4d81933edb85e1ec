"""ResSaNet's masked-face recipe: ResSaNet-50, CosFace s=64 m=0.4 through Partial FC, SGD lr 0.05, on data
of which 5% are synthetic masked copies made by maskgen.

    python -m pipeline pack MS1M_SRC --out DATA --holdout 5
    maskgen build --ratio 0.05 --data DATA          # adds masked-*.rec shards (5% of the images, masked)
    .venv/bin/python -m torch.distributed.run --nproc_per_node=8 trainer/main.py \
        --config trainer/configs/ressanet_masked.py --data DATA

The masked copies keep their source's identity, so they are ordinary training samples here; `masked` in
their label vector is what `python -m trainer.eval --masked-probe` and AAFace use.
"""
from trainer.config import Config

config = Config()
config.network = "ressanet50"
config.embedding_size = 512
config.loss = "cosface"
config.loss_kwargs = {"s": 64.0, "m": 0.4}
config.sample_rate = 1.0  # Partial FC's model-parallel classifier; lower it for tens of millions of classes
config.optimizer = "sgd"
config.lr = 0.05
config.momentum = 0.9
config.weight_decay = 5e-4
config.num_epoch = 20
config.warmup_epoch = 1.0
config.lr_schedule = "poly"
config.batch_size = 128
config.amp = "bf16"
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
