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

# Training mode (trainer/modes): "standard" (backbone -> Partial FC -> `loss`), or a paper's recipe:
# "lvface", "aaface", "sst" (their keys below; a mode ignores the others' keys)
config.mode = "standard"
# LVFace: ArcFace (scale, margin_list[1]); epochs before the switch sub-sample negatives at `sample_rate`
# (NCS), later ones use all negatives and mix each class's running feature mean into its centre (EPL)
config.lvface_switch_epoch = 40.0  # the paper switches at 40 of 100 epochs
config.lvface_epl_alpha = 0.5  # weight of the class mean in the mixed centre
config.lvface_epl_momentum = 0.9  # EMA momentum of the class means
# AAFace (network "aaface"): binary attributes by name from the manifest's label_fields ("masked" from
# maskgen, or packed with `pipeline pack --attributes`); loss lambda_fr * L_FR + sum_i lambda_i * BCE_i
config.aaface_attributes = []
config.aaface_lambdas = []  # one per attribute; [] = 1.0 each
config.aaface_lambda_fr = 1.0
config.aaface_pos_weight = []  # BCE positive weight per attribute (#neg / #pos balances it); [] = 1.0 each
config.aaface_stage_epochs = (10.0, 5.0, 5.0)  # (FR branch alone, SB branch alone, joint); sum = num_epoch
# Semi-Siamese Training (shallow data, two images per identity; no classifier)
config.sst_queue_size = 16384  # prototypes; a multiple of the global batch
config.sst_scale = 30.0
config.sst_loss_type = "softmax"  # "softmax", "am_softmax" or "arc_softmax" (with sst_margin)
config.sst_margin = 0.0
config.sst_alpha = 0.999  # momentum of the gallery network's moving average of the probe

# Data (DESIGN.md section 1); --data sets `data`
config.data = ""
config.loader_backend = "auto"  # "dali" on CUDA, "torch" on CPU
config.num_threads = 2  # decoding threads per rank
config.augment = None  # passed to pipeline.loader.build_train_loader (None: the loader's default)
config.batch_size = 128  # per rank, per micro step
# micro steps per optimizer step: the global batch is batch_size * gradient_acc * world size
config.gradient_acc = 1
# Batch mixing (trainer/mixing.py, standard mode, sample_rate 1.0): "" off, "cutmix" or "mixup"; a batch is
# mixed with probability mix_p, its share lam ~ Beta(mix_alpha, mix_alpha)
config.mix = ""
config.mix_p = 0.5
config.mix_alpha = 1.0

# Optimizer: "sgd" or "adamw". One learning rate for backbone and FC, as insightface.
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.betas = (0.9, 0.999)  # AdamW
config.eps = 1e-8  # AdamW
config.clip_grad_norm = 5.0  # max L2 norm of the backbone's gradient; 0 disables
# > 0: keep a moving average of the backbone's weights (trainer/ema.py) with this decay per optimizer
# step; the average is what is evaluated and saved as model.pt. 0: the weights as trained.
config.ema_decay = 0.0

# Schedule: linear warmup, then "poly" (lr * (1 - t)^lr_power) or "cosine", down to min_lr, or "step":
# lr * lr_gamma^k after the k-th of the epochs in lr_steps (FaceX-Zoo's MultiStepLR; trainer/schedule.py)
config.num_epoch = 20
config.warmup_epoch = 0.0
config.max_steps = 0  # > 0: stop after that many optimizer steps (the schedule still spans num_epoch)
config.lr_schedule = "poly"
config.lr_power = 2.0
config.min_lr = 0.0
config.lr_steps = ()  # "step": epochs (from the start, warmup included) at which the rate is multiplied
config.lr_gamma = 0.1  # by lr_gamma

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
