"""Does MAE pretraining pay? Fine-tuning from the pretrained encoder against the same
fine-tuning from scratch, at an equal budget, over three seeds (docs/evaluation.md).

Each seed pretrains the default recipe (configs/default.py, ViT-Mu/4 on Fashion-MNIST) for
2 epochs (the demo's length) and for 10, then fine-tunes for FINETUNE_EPOCHS epochs from
each encoder (eval.init=pretrained) and from a random initialization of the same encoder
(eval.init=random). The scratch arm does not depend on the pretraining's length (the random
init comes from the seed alone), so it runs once per seed, beside the 10-epoch pretraining.
The seed sets pretraining and fine-tuning alike. The table gives mean and spread per arm;
finetune_curves.png and the curve table give top-1 after every epoch.

  python -m mae_jax.sweep configs/ablations/pretrain_pays.py --workdir workdirs/ablations
"""
PRETRAIN_EPOCHS = (2.0, 10.0)
FINETUNE_EPOCHS = 10
# The 10-epoch recipe of docs/evaluation.md: a mild crop and flip, no mixing or RandAugment.
FINETUNE = {"finetune.num_epochs": float(FINETUNE_EPOCHS), "finetune.augment": "crop_flip",
            "finetune.crop_scale": (0.6, 1.0), "finetune.mixup": 0.0, "finetune.cutmix": 0.0,
            "finetune.randaug_ops": 0, "finetune.optim.base_lr": 2e-3}


def get_sweep():
  return dict(name="pretrain_pays", eval_overrides=dict(FINETUNE), evals="finetune",
              axes={"num_epochs": list(PRETRAIN_EPOCHS), "seed": [0, 1, 2],
                    "eval.init": ["pretrained", "random"]},
              exclude=[{"num_epochs": min(PRETRAIN_EPOCHS), "eval.init": "random"}],
              plot_x="eval.init")
