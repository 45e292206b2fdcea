"""Evaluation of an MAE encoder (paper Sec. 4 and A.2-A.3): kNN, linear probe, fine-tuning.

  features.py    frozen-encoder features of a whole split (cls token, average pool, pixels)
  knn.py         weighted kNN top-1 on cosine similarity; the pretraining monitor
  linprobe.py    BatchNorm (no affine) + linear head trained with LARS on frozen features,
                 a job on the one loop (mae_jax.train.loop)
  classifier.py  the encoder + pooling + head, parameter names shared with the MAE
  augment.py     on-device RandAugment-style ops, mixup / cutmix, smoothed targets
  finetune.py    fine-tuning the whole classifier (AdamW, layer-wise lr decay, drop path),
                 a job on the one loop (mae_jax.train.loop)
  optimizers.py  LARS and the per-layer lr scales of layer-wise decay

`python -m mae_jax.evaluate` is the command line.
"""
