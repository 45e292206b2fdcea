"""Does MAE pretraining pay? Fine-tuning from the pretrained encoder against the same
fine-tuning from scratch, at an equal budget, over three seeds (docs/evaluation.md).

Each seed pretrains the default recipe (configs/default.py, ViT-Mu/4 on Fashion-MNIST) for
PRETRAIN_EPOCHS epochs, then fine-tunes for FINETUNE_EPOCHS epochs twice: from that encoder
(eval.init=pretrained) and from a random initialization of the same encoder
(eval.init=random). The seed sets pretraining and fine-tuning alike. The table gives mean
and spread per arm; finetune_curves.png and the curve table give top-1 after every epoch.

  python -m mae_jax.sweep configs/ablations/pretrain_pays.py --workdir workdirs/ablations
"""
PRETRAIN_EPOCHS = 10
FINETUNE_EPOCHS = 10
# The 10-epoch recipe of docs/evaluation.md: a mild crop and flip, no mixing or RandAugment.
FINETUNE = {"finetune.num_epochs": float(FINETUNE_EPOCHS), "finetune.augment": "crop_flip",
            "finetune.crop_scale": (0.6, 1.0), "finetune.mixup": 0.0, "finetune.cutmix": 0.0,
            "finetune.randaug_ops": 0, "finetune.optim.base_lr": 2e-3}


def get_sweep():
  return dict(name="pretrain_pays", overrides={"num_epochs": float(PRETRAIN_EPOCHS)},
              eval_overrides=dict(FINETUNE), evals="finetune",
              axes={"seed": [0, 1, 2], "eval.init": ["pretrained", "random"]},
              plot_x="eval.init")
