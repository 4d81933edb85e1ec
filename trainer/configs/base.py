"""Every config key, with its default. A job config changes only what differs (see ms1mv3_r50.py)."""
from trainer.config import Config

config = Config()
config.config_name = ""  # set from the job module's file name when empty

# Backbone (trainer/backbones registry)
config.network = "r50"
config.embedding_size = 512
config.dropout = 0.0
config.network_kwargs = {}  # extra constructor arguments for the backbone

# Margin loss and Partial FC. margin_list = (m1, m2, m3) of CombinedMarginLoss:
# (1.0, 0.5, 0.0) is ArcFace, (1.0, 0.0, 0.4) is CosFace.
config.loss = "combined"  # "combined", "arcface", "cosface", or a head from trainer.heads' registry
config.margin_list = (1.0, 0.5, 0.0)
config.scale = 64.0
config.interclass_filtering_threshold = 0.0
config.loss_kwargs = {}  # extra arguments for a head from trainer.heads
config.sample_rate = 1.0

# Data (DESIGN.md section 1); --data sets `data`
config.data = ""
config.loader_backend = "auto"  # "dali" on CUDA, "torch" on CPU
config.num_threads = 2  # decoding threads per rank
config.augment = None  # passed to pipeline.loader.build_train_loader (None: the loader's default)
config.batch_size = 128  # per rank, per micro step
# micro steps per optimizer step: the global batch is batch_size * gradient_acc * world size
config.gradient_acc = 1

# Optimizer: "sgd" or "adamw". One learning rate for backbone and FC, as insightface.
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.betas = (0.9, 0.999)  # AdamW
config.eps = 1e-8  # AdamW
config.clip_grad_norm = 5.0  # max L2 norm of the backbone's gradient; 0 disables

# Schedule: linear warmup, then "poly" (lr * (1 - t)^lr_power) or "cosine", down to min_lr
config.num_epoch = 20
config.warmup_epoch = 0.0
config.max_steps = 0  # > 0: stop after that many optimizer steps (the schedule still spans num_epoch)
config.lr_schedule = "poly"
config.lr_power = 2.0
config.min_lr = 0.0

# Precision: "fp32", "bf16", or "fp16" (fp16 uses a GradScaler). The softmax of Partial FC stays fp32.
config.amp = "fp32"
config.channels_last = False

# Run
config.seed = 2048
config.deterministic = False  # torch.use_deterministic_algorithms (slower on CUDA)
config.output = ""  # --output sets it; default runs/<config_name>
config.frequent = 10  # log every N optimizer steps
config.tensorboard = True
config.progress_bar = True

# Evaluation on rank 0 every `verbose` steps and at the end: .bin packs or pairs.txt lists. A relative
# name is looked up in the data folder too, with ".bin" added when missing (insightface: "lfw").
config.val_targets = []
config.verbose = 2000
config.val_batch_size = 64

# Checkpoints in OUTPUT/checkpoints/step_XXXXXXXX/, atomically; 0 = at the end of every epoch only
config.save_every = 0
config.save_epoch_end = True
config.keep_checkpoints = 2
config.auto_resume = True  # resume from OUTPUT's last checkpoint when --resume is not given

# Faults
config.max_nan_steps = 10  # stop after this many non-finite steps in a row
