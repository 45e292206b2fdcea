"""The training machinery, for every job that trains (pretraining, fine-tuning, the linear
probe, the conv baseline).

  optim        AdamW, the schedule and the paper's lr rule
  sharding     the device mesh, parameter and activation sharding, global batches
  train_step   the pure MAE train and eval steps
  program      the one program builder: every jitted program is built here
  loop         the one training loop: lock, checkpoints, resume, SIGTERM, non-finite stop
  checkpoints  Orbax training checkpoints, verified by their manifests
  workdirs     the workdir's lock and each launch's config; param_dirs: parameter directories
  logger       progress lines, TensorBoard, metrics.jsonl, W&B, the input-wait share
  distributed  multi-process start-up and the graceful stop
  config       config validation, durations, resume checks; stages: config.schedule
  pretrained   a trained or converted model and its params, loaded from disk
"""
