"""Time to quality: the default recipe at one resolution against progressive resolution
(mae_jax.train.stages), three seeds each, with the monitors off so that wall_seconds is
training alone (compilation of every stage included).

Each point is the default recipe (2 epochs: 936 steps of batch 128) or the same recipe
shortened (1.25 epochs, the fixed arm at about the progressive arm's wall time) or
lengthened (3 epochs, progressive), then kNN on the whole splits. The fixed recipe's final
test masked MSE and kNN top-1 are the targets; the main arms (fixed and progressive at 2
epochs) run three seeds, the others two. docs/benchmarks.md has the table, made by
  python benchmarks/time_to_quality.py configs/ablations/schedule.py --workdir DIR

  python -m mae_jax.sweep configs/ablations/schedule.py --workdir workdirs/ablations
"""
FIXED = ()
PROGRESSIVE = ((0.0, 16), (0.5, 24), (0.8, 28))  # 16 px, then 24 px from half way, 28 px


def get_sweep():
  return dict(
      name="schedule",
      overrides={"knn_every_epochs": 0.0, "vis_every_steps": 10**6,
                 "checkpoint_every_steps": 500, "log_every_steps": 100},
      evals="knn",
      # seed outermost: the arms alternate, so a busy spell of the machine hits both
      axes={"seed": [0, 1, 2], "schedule.resolution": [FIXED, PROGRESSIVE],
            "num_epochs": [2.0, 1.25, 3.0]},  # the first arm is the reference
      exclude=[{"schedule.resolution": FIXED, "num_epochs": 3.0},
               {"schedule.resolution": PROGRESSIVE, "num_epochs": 1.25},
               {"seed": 2, "num_epochs": 1.25}, {"seed": 2, "num_epochs": 3.0}],
      plot_x="schedule.resolution")
