"""Default recipe: a small ViT MAE on Fashion-MNIST, sized for a few minutes on 2 CPU cores.

The paper's recipe (AdamW 0.9/0.95, wd 0.05, base lr 1.5e-4 scaled by batch/256, warmup
then cosine, mask ratio 0.75, crop 0.2-1 + flip) at a scale that fits 28 x 28 images.
Override any field: --config.model.depth=4 --config.batch_size=512.
"""
from ml_collections import config_dict


def get_config():
  c = config_dict.ConfigDict()
  c.seed = 0

  c.data = config_dict.ConfigDict()
  c.data.name = "fashion_mnist"  # fashion_mnist | synthetic | folder | any TFDS image dataset
  c.data.data_dir = config_dict.placeholder(str)    # IDX dir / TFDS data_dir / image folder
  c.data.manual_dir = config_dict.placeholder(str)  # TFDS manual_dir (imagenet2012)
  c.data.image_size = 28
  c.data.channels = 1
  c.data.augment = "crop_flip"  # none | crop | crop_flip
  c.data.crop_scale = (0.2, 1.0)
  c.data.num_workers = 0  # host decode threads (JPEG folders); 0 = in the calling thread
  c.data.worker_processes = 0  # host processes making whole batches (grain multiprocessing)
  c.data.repeat_samples = 1  # k crops/flips/masks of each decoded image per batch (MAE-ST)
  c.data.jpeg_draft = True  # JPEGs: DCT-domain downscale on decode where the crop allows
  # Where training crops are resized to image_size: host (Pillow, in the input pipeline),
  # device (the host cuts each crop's region, the accelerator resizes it: 2.6-2.8x the
  # samples per host CPU-second, the same crops, pixels within a few levels of Pillow's;
  # docs/benchmarks.md), or auto: device on GPU / TPU, host on CPU.
  c.data.resize = "auto"
  # Warn once when more than this share of wall time goes to waiting for the next batch.
  c.data.input_wait_warn = 0.2
  c.data.synthetic_size = 4096
  c.data.train_examples = config_dict.placeholder(int)  # evenly spaced subset; None = all
  # Image folders: False = skip (and count) files that cannot be decoded; True = stop at
  # the first one, naming it.
  c.data.strict = False

  c.model = config_dict.ConfigDict()
  c.model.variant = "Mu/4"  # SIZE/PATCH from models.SIZES (Mu, Ti, S, B, L, H) or a preset
  # Overrides of the variant's sizes; None = the variant's.
  c.model.width = config_dict.placeholder(int)
  c.model.depth = config_dict.placeholder(int)
  c.model.num_heads = config_dict.placeholder(int)
  c.model.patch_size = config_dict.placeholder(int)
  c.model.mlp_ratio = 4.0
  c.model.decoder_width = 64  # the paper's is 512 x 8 (configs/mae_imagenet.py)
  c.model.decoder_depth = 2
  c.model.decoder_heads = 4
  c.model.mask_ratio = 0.75
  c.model.mask_strategy = "random"  # random | block | grid | center
  # visible: the encoder drops masked patches (MAE); all: masked patches enter the encoder
  # as a learned mask token (the paper's "w/ [M]" ablation, slower).
  c.model.encoder_tokens = "visible"
  # Pixel targets (not per-patch normalized) so reconstructions are images and the
  # test MSE is in [0, 1] pixels; the ImageNet recipe turns it on, as the paper does.
  c.model.norm_pix_loss = False
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  # none | full | dots. full: the backward pass recomputes each block's forward pass; on
  # CPU that is 1.3x faster than none for this model (docs/benchmarks.md). On GPU / TPU
  # use none unless memory needs more (configs/mae_imagenet.py).
  c.model.remat = "full"
  c.model.unroll = False
  c.model.attn_impl = config_dict.placeholder(str)  # None (auto) | xla | cudnn
  c.model.matmul = "auto"  # Dense kernels: auto (by the devices' platform) | xla | cpu

  # Stages (mae_jax.train.stages): from a fraction of training on, another image size or
  # mask ratio, e.g. resolution=((0.0, 16), (0.5, 24), (0.8, 28)): each stage compiles
  # once, batches and masks stay functions of (seed, step), the lr schedule is unchanged.
  # Empty: every step at data.image_size and model.mask_ratio.
  c.schedule = config_dict.ConfigDict()
  c.schedule.resolution = ()
  c.schedule.mask_ratio = ()

  c.batch_size = 128  # global batch, over all devices and processes
  # Split each step's batch into this many micro-batches (scanned, gradients averaged):
  # the same update with less activation memory.
  c.grad_accum_steps = 1
  c.num_epochs = 2.0
  c.num_steps = config_dict.placeholder(int)  # overrides num_epochs when set
  # Start from the params of an imported checkpoint (python -m mae_jax.convert ...);
  # ignored once the workdir has checkpoints of its own.
  c.init_from = config_dict.placeholder(str)
  # Leave after this many steps of this invocation (checkpoint saved), e.g. to fit a
  # scheduler's time slice; running again resumes. None = run to the end.
  c.stop_after_steps = config_dict.placeholder(int)

  c.optim = config_dict.ConfigDict()
  # lr = base_lr * batch_size / 256. The paper uses 1.5e-4 over 800+ epochs; this 2-epoch
  # CPU demo needs a 20x higher rate to learn in its ~900 steps.
  c.optim.base_lr = 3e-3
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = 0.25
  c.optim.warmup_steps = config_dict.placeholder(int)  # overrides warmup_epochs when set
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.grad_clip = config_dict.placeholder(float)

  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1  # -1 = all devices not used by the other axis
  c.mesh.fsdp = 1

  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  # A step whose loss, gradients or updated params are not finite stops the run (naming the
  # step and the last good checkpoint); True = drop that update, count it, go on.
  c.skip_nonfinite = False
  c.eval_batch_size = 512  # global; divisible by the data-parallel devices
  c.num_vis_images = 8
  # Reconstructions of num_vis_images fixed test images in TensorBoard every N steps (tag
  # reconstructions); None = only reconstructions.png at the end. The demo's ~940 steps
  # show 9 pictures, the end's the tenth.
  c.vis_every_steps = 100
  # kNN monitor (k=20, T=0.07 on cls features) every N epochs, logged as eval/knn_top1;
  # 0 = off (and off, with a note, on a dataset without labels). Its memory bank is a
  # fixed, seeded subset of knn_bank_size training images scored on knn_test_size test
  # images (None: the whole split): here 12k images a check, which read 4.6-4.8 points
  # under the whole splits' top-1 and follow its trend (docs/evaluation.md).
  c.knn_every_epochs = 1.0
  c.knn_bank_size = 10000
  c.knn_test_size = 2000
  # Where the run's scalars and pictures go besides TensorBoard and metrics.jsonl (always
  # written). wandb: a Weights & Biases project that gets the same scalars and pictures,
  # every launch of a workdir in one W&B run (pip install 'mae_jax[wandb]'; W&B's own
  # settings apply: WANDB_ENTITY, WANDB_MODE=offline, WANDB_DIR...); None = off.
  c.logging = config_dict.ConfigDict()
  c.logging.wandb = config_dict.placeholder(str)
  c.smoke = False  # True: a tiny model and a few steps, for a quick check of any recipe
  # True: resume a workdir whose run was launched with other values (listed at start-up;
  # each launch's config is kept in WORKDIR/configs/). False: such a resume is refused.
  c.allow_config_change = False
  return c
