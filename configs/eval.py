"""Evaluation recipe for `python -m mae_jax.evaluate` (kNN, linear probe, fine-tuning).

The model and dataset come from the pretraining workdir (its config.json); this file
holds only how to evaluate. The paper's recipes (Sec. A.2, A.3) at a scale that fits
Fashion-MNIST on 2 CPU cores: where a value differs from the paper's, the comment says so.
Override any field: --config.finetune.num_epochs=10 --config.init=random.
"""
from ml_collections import config_dict


def get_config():
  c = config_dict.ConfigDict()
  c.seed = 0
  # pretrained: the workdir's latest checkpoint (or `params`); random: the same encoder at
  # its random initialization (the baseline; for finetune: training from scratch).
  c.init = "pretrained"
  # A `python -m mae_jax.convert import` output to evaluate instead of the workdir's
  # checkpoints (its model.json gives the model).
  c.params = config_dict.placeholder(str)
  c.checkpoint_step = config_dict.placeholder(int)  # None = the latest

  # Dataset overrides; None = the pretraining run's (config.json). data.name is needed
  # only where the workdir has no config.json (e.g. with `params`).
  c.data = config_dict.ConfigDict()
  c.data.name = config_dict.placeholder(str)
  c.data.data_dir = config_dict.placeholder(str)
  c.data.manual_dir = config_dict.placeholder(str)
  c.data.num_workers = config_dict.placeholder(int)
  c.data.synthetic_size = config_dict.placeholder(int)
  # Evaluate against this many evenly spaced training images (kNN memory bank, linear
  # probe and fine-tuning set); None = the whole training split. The test split is whole.
  c.data.train_examples = config_dict.placeholder(int)

  c.eval_batch_size = 512  # global: feature extraction and test batches
  # The linear probe and fine-tuning are jobs with their own workdir (DIR/<name>/) on the
  # training loop: checkpoints (every <mode>.checkpoint_every_steps, at the end, on
  # SIGTERM / SIGINT) and exact resume by running the same command again.
  c.keep_checkpoints = 2
  # Leave after this many steps of this launch (checkpoint saved); None = run to the end.
  c.stop_after_steps = config_dict.placeholder(int)
  # True: resume a job launched with other values (listed at start); False: refused.
  c.allow_config_change = False
  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  # A Weights & Biases project that gets the linear probe's and fine-tuning's scalars too,
  # each job in the W&B run of its directory (configs/default.py); None = off.
  c.logging = config_dict.ConfigDict()
  c.logging.wandb = config_dict.placeholder(str)

  # kNN on frozen features (Wu et al. 2018; the temperature-weighted vote of DINO).
  c.knn = config_dict.ConfigDict()
  c.knn.features = "cls"  # cls | avg | pixels
  c.knn.k = 20
  c.knn.temperature = 0.07

  # Linear probe: BatchNorm (no affine) + linear head on frozen features, LARS.
  c.linprobe = config_dict.ConfigDict()
  c.linprobe.features = "cls"  # cls | avg | pixels (pixels = logistic regression baseline)
  c.linprobe.batch_size = 256  # paper: 16384 (ImageNet); lr scales with it
  c.linprobe.num_epochs = 90.0
  c.linprobe.num_steps = config_dict.placeholder(int)
  c.linprobe.log_every_steps = 2000
  c.linprobe.checkpoint_every_steps = 5000
  c.linprobe.optim = config_dict.ConfigDict()
  c.linprobe.optim.base_lr = 0.1  # lr = base_lr * batch_size / 256
  c.linprobe.optim.min_lr = 0.0
  c.linprobe.optim.warmup_epochs = 10.0
  c.linprobe.optim.warmup_steps = config_dict.placeholder(int)
  c.linprobe.optim.momentum = 0.9
  c.linprobe.optim.trust_coefficient = 0.001
  c.linprobe.optim.weight_decay = 0.0

  # Fine-tuning the whole encoder with a new head.
  c.finetune = config_dict.ConfigDict()
  c.finetune.pool = "avg"  # avg: global average pool + LayerNorm | cls: cls token
  c.finetune.batch_size = 256  # paper: 1024
  c.finetune.num_epochs = 3.0  # paper: 100 (ViT-B), 50 (ViT-L/H)
  c.finetune.num_steps = config_dict.placeholder(int)
  c.finetune.eval_every_epochs = 1.0  # test top-1 every N epochs (0: only at the end)
  c.finetune.log_every_steps = 50
  # About every 10 minutes of work on 2 CPU cores for the default ViT-Mu/4 (~2.3 s a step
  # of batch 256); on an accelerator, raise it to what ten minutes are there.
  c.finetune.checkpoint_every_steps = 250
  # Remat policy of the classifier's blocks (none | full | dots); None = the pretraining
  # model's. Compute only: the result is the same.
  c.finetune.remat = config_dict.placeholder(str)
  c.finetune.drop_path = 0.1
  # learned: a trained pos_embed initialized from the sin-cos table (the reference's
  # fine-tuning, no weight decay, layer 0 of the lr decay) | fixed: the table as pretrained
  c.finetune.pos_embed = "learned"
  c.finetune.label_smoothing = 0.1
  c.finetune.mixup = 0.8  # Beta(alpha, alpha); 0 = off
  c.finetune.cutmix = 1.0  # 0 = off
  c.finetune.mixup_prob = 1.0
  c.finetune.mixup_switch_prob = 0.5  # cutmix instead of mixup, where both are on
  c.finetune.randaug_ops = 2  # RandAugment ops per image; 0 = off
  c.finetune.randaug_magnitude = 9.0  # 0..10
  c.finetune.randaug_prob = 0.5  # each drawn op is applied with this probability (timm)
  c.finetune.augment = "crop_flip"  # host: none | crop | crop_flip (random-resized crop)
  c.finetune.crop_scale = (0.08, 1.0)
  c.finetune.optim = config_dict.ConfigDict()
  c.finetune.optim.base_lr = 5e-4  # lr = base_lr * batch_size / 256
  c.finetune.optim.min_lr = 1e-6
  c.finetune.optim.warmup_epochs = 0.5  # paper: 5
  c.finetune.optim.warmup_steps = config_dict.placeholder(int)
  c.finetune.optim.layer_decay = 0.75
  c.finetune.optim.weight_decay = 0.05
  c.finetune.optim.b1 = 0.9
  c.finetune.optim.b2 = 0.999
  c.finetune.optim.grad_clip = config_dict.placeholder(float)
  return c
