"""The paper's ImageNet-1k recipe: ViT-L/16 encoder, 512 x 8 decoder, 800 epochs.

Batch 4096, base lr 1.5e-4 (lr 2.4e-3), AdamW (0.9, 0.95), wd 0.05, 40 warmup epochs,
mask ratio 0.75, per-patch normalized targets, bfloat16 compute. Needs the TFDS
imagenet2012 dataset prepared in array_record format:
  python train.py --config configs/mae_imagenet.py --workdir DIR \
    --config.data.data_dir=~/tensorflow_datasets --config.data.manual_dir=DIR_WITH_TARS
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.channels = 3
  c.data.num_workers = 16

  c.model.variant = "L/16"
  c.model.decoder_width = 512
  c.model.decoder_depth = 8
  c.model.decoder_heads = 16
  c.model.norm_pix_loss = True
  c.model.dtype = "bfloat16"
  c.model.remat = "none"  # accelerators: no recompute; dots or full if memory is short

  c.batch_size = 4096
  c.num_epochs = 800.0
  c.optim.base_lr = 1.5e-4
  c.optim.warmup_epochs = 40.0
  c.checkpoint_every_steps = 1000
  # The kNN monitor every epoch on 25k images (20k bank, 5k test): encoding them costs
  # under 2 % of an epoch of B/16 training (35.1 against 58.7 GFLOP an image: at most
  # 0.02 x 1.28M x 58.7 / 35.1 = 42.8k images; docs/evaluation.md)
  c.knn_bank_size = 20000
  c.knn_test_size = 5000
  c.log_every_steps = 100
  c.eval_batch_size = 1024
  return c
