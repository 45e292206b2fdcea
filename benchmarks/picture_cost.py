"""What one reconstruction picture (evaluation.watch) costs against one training step.

  python benchmarks/picture_cost.py [--variant B/16] [--image_size 224] [--batch_size 8] \
      [--rounds 3]

The ImageNet recipe (configs/mae_imagenet.py) at `variant` on synthetic data, float32:
the train step and the monitor's picture program (its eval step on the num_vis_images
fixed test images), each compiled first, then timed interleaved round by round in one
process (so load from other jobs hits both alike), and the grid drawn from the program's
output (the monitor's background thread does that). Medians are printed. On a CPU the
picture program runs on the cores that train, so its time is what a picture costs the
run, not only what it costs the training thread (what the run's own log line reports).
"""
import argparse
import statistics
import time

import jax
import numpy as np

from configs import mae_imagenet
from mae_jax import trainer
from mae_jax.evaluation import pictures, watch


def build(variant, image_size, batch_size):
  config = mae_imagenet.get_config()
  with config.unlocked():
    config.model.variant, config.model.dtype = variant, "float32"
    config.data.update(name="synthetic", synthetic_size=2 * batch_size, image_size=image_size,
                       num_workers=0)
    config.update(batch_size=batch_size, eval_batch_size=batch_size, num_steps=12,
                  knn_every_epochs=0)
    config.optim.warmup_steps = 2
  run = trainer.build_run(config, "/tmp/picture_cost")  # nothing is written there
  return run, watch.ReconstructionMonitor(run, every_steps=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  run, monitor = build(args.variant, args.image_size, args.batch_size)
  state = run.init(jax.random.key(0))
  batch = next(iter(trainer.device_batches(run, 0)))
  rng = jax.random.key(1)

  def step():
    nonlocal state
    t0 = time.perf_counter()
    state, metrics = run.step(state, batch, rng)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0

  def picture():
    t0 = time.perf_counter()
    out = jax.block_until_ready(monitor.fn(state.params, monitor.batch, monitor.rng))
    t1 = time.perf_counter()
    n = len(monitor.images)
    pictures.reconstruction_picture(monitor.images, np.asarray(out["pred"])[:n],
                                    np.asarray(out["mask"])[:n], run.model.patch_size,
                                    title="x")
    return t1 - t0, time.perf_counter() - t1

  print(f"{run.num_params / 1e6:.2f}M-parameter MAE, {args.variant} at {args.image_size} px, "
        f"train batch {args.batch_size}, picture of {len(monitor.images)} images")
  print(f"compile + first: step {step():.1f} s, picture {sum(picture()):.1f} s", flush=True)
  steps, programs, drawings = [], [], []
  for r in range(args.rounds):
    steps.append(step())
    program, drawing = picture()
    programs.append(program)
    drawings.append(drawing)
    print(f"round {r}: step {steps[-1]:.2f} s, picture program {program:.2f} s, "
          f"drawing {drawing:.3f} s", flush=True)
  s, p = statistics.median(steps), statistics.median(programs)
  print(f"median: step {s:.2f} s, picture program {p:.2f} s ({p / s:.2f} of a step), "
        f"drawing {statistics.median(drawings):.3f} s")


if __name__ == "__main__":
  main()
