"""Every config key shared by all training modes, with its default; each mode adds its own keys (the
`CONFIG` dict of its module in trainer/modes/). A job config changes only what differs (see ms1mv3_r50.py)."""
from trainer.config import Config

config = Config()
config.config_name = ""  # set from the job module's file name when empty

# Backbone (trainer/backbones registry)
config.network = "r50"
config.embedding_size = 512
config.dropout = 0.0
config.network_kwargs = {}  # extra constructor arguments for the backbone
# Start the backbone from trained weights (fine-tuning): a model.pt, a checkpoint or run folder, or an
# insightface IResNet state dict (trainer/init_weights.py). "" = random initialisation.
config.init_weights = ""

# Training mode (trainer/modes): "standard" (backbone -> Partial FC -> a margin head), or a paper's recipe:
# "lvface", "aaface", "sst". The mode's module declares its keys (CONFIG): the margin head's (loss,
# margin_list, scale, ...) in trainer/modes/standard.py, shared by lvface and aaface; a key of a mode
# that is not selected is an error.
config.mode = "standard"

# Data (docs/design.md section 1); --data sets `data`
config.data = ""
config.loader_backend = "auto"  # "dali" on CUDA, "torch" on CPU; "nvjpeg": torchvision's nvJPEG on the GPU
config.num_threads = 2  # decoding threads (torch reader: workers; nvjpeg: host threads) per rank
# DALI only: its CPU threads per rank (the reader, and the host half of nvJPEG's hybrid decoding; 0 takes
# num_threads), the share of images for the hardware JPEG decoder of A100/H100 (the rest: nvJPEG on the
# CUDA cores), and plain reads instead of mmap (DALI's advice for network file systems; it also keeps the
# shards' pages out of the training process's RSS: an epoch of 10^6 images on the CPU peaked at 2168 MiB
# PSS mapped, 1030 with reads, bench/log/pack.md)
config.dali_threads = 4
config.dali_hw_decoder_load = 0.65
config.dali_dont_use_mmap = False
# DALI cannot skip an image that fails to decode: its reader is given only records whose framing, label and
# image headers check out (cached per shard). True also decodes each image once at the first start (~1 ms
# an image, cached), so that corrupt pixel data is skipped and counted as the torch/nvjpeg readers do.
config.dali_decode_check = False
# Augmentations: a dict of pipeline/augment.py's AugmentConfig fields (flip, crop_area, brightness, contrast,
# saturation, grey_p, erase_p, erase_area), documented there with their defaults; None: flip only.
config.augment = None
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
# CUDA only (trainer/cuda_flags.py, which the benches call too): cuDNN picks the fastest convolution
# algorithms on the first batch (off when `deterministic`); fp32 matmuls/convolutions on TF32 tensor cores
config.cudnn_benchmark = True
config.tf32 = True

# Run
config.seed = 2048
config.deterministic = False  # torch.use_deterministic_algorithms (slower on CUDA)
config.output = ""  # --output sets it; default runs/<config_name>
config.frequent = 10  # log every N optimizer steps
config.tensorboard = True
config.progress_bar = True
# Weights & Biases (needs the `wandb` package; a run with wandb=True and no package stops before training)
config.wandb = False
config.wandb_project = "facetrain"
config.wandb_entity = ""  # empty: wandb's default entity
config.wandb_run_name = ""  # empty: the run folder's name
# A resume whose config differs in a key that changes what is trained (lr, batch_size, network, ...;
# the free keys are trainer/config.py's RESUME_FREE_KEYS) is refused unless this is set
# (or --allow-config-change is passed)
config.allow_config_change = False

# Evaluation on rank 0 every `verbose` steps and at the end: .bin packs or pairs.txt lists. A relative
# name is looked up in the data folder too, with ".bin" added when missing (insightface: "lfw").
# A pairs.txt over raw photos is an error before the first step unless val_align: then its faces are
# aligned once (pipeline/align.py) and cached as <name>.aligned.bin beside it (or in OUTPUT/val_cache/
# when that folder is read-only), which later runs and `python -m trainer.eval` read instead.
config.val_targets = []
config.val_align = False
config.verbose = 2000
config.val_batch_size = 64
# > 0: stop when that many evaluations in a row have not raised the validation accuracy; model.pt is then
# the best evaluation's weights (trainer/early_stop.py). The metric: "val_targets" (mean pair verification
# accuracy) or "closed_set" (top-1 accuracy of the run's classifier on `pack --val-split`'s val shards)
config.early_stop_patience = 0
config.early_stop_metric = "val_targets"

# Checkpoints in OUTPUT/checkpoints/step_XXXXXXXX/, atomically; 0 = at the end of every epoch only
config.save_every = 0
config.save_epoch_end = True
config.keep_checkpoints = 2
config.auto_resume = True  # resume from OUTPUT's last checkpoint when --resume is not given

# Faults
config.max_nan_steps = 10  # stop after this many non-finite steps in a row
