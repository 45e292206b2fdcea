"""Time to quality on colour photographs at 64 px: fixed resolution against progressive
(32, then 48 px from half way, 64 px for the last fifth), three seeds each, monitors off.

The images: benchmarks/photos.py's crops of scikit-image's nine bundled photographs, at
96 x 72, 300 per photograph (the folder holds out every tenth as the test split); the
label is the photograph, so kNN top-1 asks whether the encoder tells the scenes apart.
Make them, then run the sweep (PHOTOS_DIR: where they are, default workdirs/photos64):
  python -c "import sys; sys.path.insert(0, 'benchmarks'); import photos; \
      photos.write_photo_folder('workdirs/photos64', 2700, size=(96, 72))"
  python -m mae_jax.sweep configs/ablations/schedule_photos.py --workdir workdirs/ablations
"""
import os

FIXED = ()
PROGRESSIVE = ((0.0, 32), (0.5, 48), (0.8, 64))


def get_sweep():
  return dict(
      name="schedule_photos",
      overrides={"data.name": "folder",
                 "data.data_dir": os.path.abspath(os.environ.get("PHOTOS_DIR",
                                                                 "workdirs/photos64")),
                 "data.image_size": 64, "data.channels": 3, "model.patch_size": 8,
                 "num_epochs": 12.0, "optim.warmup_epochs": 1.0, "knn_every_epochs": 0.0,
                 "vis_every_steps": 10**6, "checkpoint_every_steps": 500,
                 "log_every_steps": 60},
      evals="knn",
      axes={"seed": [0, 1, 2], "schedule.resolution": [FIXED, PROGRESSIVE]},
      plot_x="schedule.resolution")
