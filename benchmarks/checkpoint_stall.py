"""How long `Checkpointer.save` holds up the training loop, per checkpoint.

  python benchmarks/checkpoint_stall.py --dir /tmp/ckpt_bench            # local disk
  python benchmarks/checkpoint_stall.py --dir gs://BUCKET/ckpt_bench     # Cloud Storage
  python benchmarks/checkpoint_stall.py --dir ... --emulator             # gs:// on a local
                                                                         # fake-gcs-server

The state is a ViT-B/16 MAE TrainState (the paper's 512 x 8 decoder, 224 px: params and
AdamW's two moments, float32, 1.25 GiB). Each round saves it once and times the `save`
call: what the training loop waits for (the device-to-host copy, and with synchronous
manifests the manifest of the previous step, written in `save`: every file read back and
CRC'd). The asynchronous write and the manifest thread are then waited for outside the
timing, as if training ran meanwhile. `--manifests sync` restores the former behaviour (the manifest of
each finished step written in `save`, reading every file back) for the comparison.
"""
import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from mae_jax import paths  # noqa: E402
from mae_jax.train import checkpoints
from mae_jax.train import train_step as ts  # noqa: E402
from mae_jax.model.mae import MaskedAutoencoder  # noqa: E402


def vit_b16_state():
  model = MaskedAutoencoder(image_size=224, patch_size=16, channels=3, width=768, depth=12,
                            num_heads=12, decoder_width=512, decoder_depth=8,
                            decoder_heads=16)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
  init = jax.jit(lambda rng: ts.init_state(model, tx, rng, (224, 224, 3)))
  return jax.block_until_ready(init(jax.random.key(0)))


def sync_manifests(directory):
  """The former design: every file of each finished step read back and CRC'd, in `save`."""
  for step in checkpoints.complete_steps(directory):
    step_dir = paths.join(directory, str(step))
    if not paths.exists(paths.join(step_dir, checkpoints.MANIFEST)):
      files = {rel: [size, checkpoints.file_crc32(paths.join(step_dir, rel))]
               for rel, (size, _) in checkpoints.step_listing(step_dir).items()}
      paths.write_atomic(paths.join(step_dir, checkpoints.MANIFEST),
                         checkpoints.json.dumps({"files": files}))


class SyncManifestCheckpointer(checkpoints.Checkpointer):
  def write_manifests(self):
    sync_manifests(self.directory)


def measure(directory, rounds, mode):
  cls = SyncManifestCheckpointer if mode == "sync" else checkpoints.Checkpointer
  ckpt = cls(directory, keep=2, every_steps=1)
  state = vit_b16_state()
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  stalls, background = [], []
  for step in range(1, rounds + 1):
    state = state.replace(step=jnp.asarray(step, state.step.dtype))
    t0 = time.perf_counter()
    ckpt.save(step, state, force=True)
    stalls.append(time.perf_counter() - t0)
    # training would run meanwhile: the asynchronous write, and the manifest thread, finish
    ckpt.manager.wait_until_finished()
    if ckpt._pending is not None:
      concurrent.futures.wait([ckpt._pending])
    background.append(time.perf_counter() - t0 - stalls[-1])
  ckpt.close()
  return nbytes, stalls, background


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dir", default=None, help="checkpoint directory (local or gs://)")
  parser.add_argument("--emulator", action="store_true",
                      help="start fake-gcs-server on 127.0.0.1 and use gs://bench/ckpt")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--manifests", choices=["background", "sync", "both"], default="both")
  args = parser.parse_args()
  emulator = None
  if args.emulator:
    import gcs_emulator
    emulator = gcs_emulator.Emulator(tempfile.mkdtemp(prefix="gcs_bench_") + "/objects").start()
    os.environ.update(emulator.env())
    emulator.create_bucket("bench")
  try:
    for mode in (["sync", "background"] if args.manifests == "both" else [args.manifests]):
      directory = paths.join(args.dir or ("gs://bench/ckpt" if emulator else
                                          tempfile.mkdtemp(prefix="ckpt_bench_")), mode)
      nbytes, stalls, background = measure(directory, args.rounds, mode)
      later = stalls[1:]  # the first save has no previous step to manifest
      print(f"{mode:10s} {directory}: state {nbytes / 2**30:.2f} GiB; save() stall per "
            f"checkpoint: median {statistics.median(later):.2f} s over saves 2..{args.rounds} "
            f"({', '.join(f'{s:.2f}' for s in stalls)}); write + manifest after it: median "
            f"{statistics.median(background):.2f} s", flush=True)
  finally:
    if emulator:
      emulator.stop()


if __name__ == "__main__":
  main()
