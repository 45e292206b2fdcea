"""What every ablation sweep shares: the budget per point and the evaluations.

Each point pretrains the default recipe (configs/default.py: ViT-Mu/4 on Fashion-MNIST,
batch 128) for 150 steps (0.32 epoch; the full default is 936), then runs kNN and a
90-epoch linear probe against 5,000 evenly spaced training images (the test split whole).
About 3 to 4 minutes per point on 2 CPU cores. Change the budget here, or per sweep in its
get_sweep(), e.g. overrides={"num_steps": 936}.
"""
PRETRAIN = {"num_steps": 150, "optim.warmup_steps": 15, "checkpoint_every_steps": 50,
            "log_every_steps": 50}
CONV = {"num_steps": 150, "optim.warmup_steps": 15, "log_every_steps": 50}
# LARS moves each weight by about lr x 0.001 x its norm per step: 90 epochs of 5,000
# examples are only 1,710 steps, so the probe's base lr is raised from the paper's 0.1 to
# 20 (on a 150-step encoder: 75.3 % top-1 at 20, 73.3 % at 5, 66.4 % at 1; 30 epochs at
# 0.1 gave 29.2 %, an untrained probe).
EVAL = {"data.train_examples": 5000, "linprobe.num_epochs": 90.0,
        "linprobe.optim.warmup_epochs": 5.0, "linprobe.optim.base_lr": 20.0}
EVALS = "knn,linprobe"


def sweep(name, **spec):
  """A sweep dict with the shared budget; `spec` adds axes or points (and may override)."""
  return dict(dict(name=name, overrides=dict(PRETRAIN), conv_overrides=dict(CONV),
                   eval_overrides=dict(EVAL), evals=EVALS), **spec)
