"""gs:// paths against a real GCS API server on 127.0.0.1 (fake-gcs-server, tests/gcs_emulator.py):
Orbax checkpoints, the path layer, manifests and verification, and train.py end to end."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mae_jax import checkpoint, paths


def small_state(scale=1.0):
  return {"w": jnp.arange(4096, dtype=jnp.float32) * scale,
          "b": {"c": jnp.full((3, 5), scale, jnp.float32)}, "step": jnp.asarray(7)}


def test_orbax_manager_saves_and_restores_on_the_emulator(gcs_server, gcs_bucket):
  directory = f"{gcs_bucket}/ckpt"
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  for step in (1, 2, 3):
    manager.save(step, args=ocp.args.StandardSave(small_state(step)))
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  restored = manager.restore(3, args=ocp.args.StandardRestore(small_state()))
  manager.close()
  np.testing.assert_array_equal(restored["w"], small_state(3)["w"])
  np.testing.assert_array_equal(restored["b"]["c"], small_state(3)["b"]["c"])
  # the objects are on the server (listed by its own API), and step 1 was deleted (keep 2)
  names = gcs_server.objects(gcs_bucket[len("gs://"):], "ckpt/")
  assert {n.split("/")[1] for n in names} == {"2", "3"}
  assert "ckpt/3/commit_success.txt" in names


def test_paths_reject_a_gs_path_without_a_bucket():
  for bad, why in [("gs://", "no bucket"), ("gs:///run", "no bucket"),
                   ("gs://Bad_Bucket/run", "not a valid bucket name")]:
    with pytest.raises(paths.PathError, match=why) as e:
      paths.resolve(bad)
    assert str(e.value).startswith(f"{bad}: ")


def test_paths_write_read_list_on_gcs(gcs_bucket):
  root = f"{gcs_bucket}/run"
  paths.makedirs(root)
  paths.write_atomic(paths.join(root, "a.json"), '{"x": 1}')
  paths.write_atomic(paths.join(root, "sub", "b.bin"), b"\0\1\2")
  assert json.loads(paths.read_text(paths.join(root, "a.json"))) == {"x": 1}
  assert paths.listdir(root) == ["a.json", "sub"]
  assert paths.isdir(paths.join(root, "sub")) and paths.isfile(paths.join(root, "a.json"))
  assert not paths.exists(paths.join(root, "c.json"))
  assert paths.walk_files(root) == {"a.json": 8, "sub/b.bin": 3}


def checkpointer_with_steps(directory, steps=(2, 4)):
  ckpt = checkpoint.Checkpointer(directory, keep=3, every_steps=2)
  for step in steps:
    ckpt.save(step, small_state(step))
  ckpt.wait()
  return ckpt


def test_checkpointer_on_gcs_writes_manifests_and_restores(gcs_bucket):
  directory = f"{gcs_bucket}/run/checkpoints"
  ckpt = checkpointer_with_steps(directory)
  assert checkpoint.complete_steps(directory) == [2, 4]
  manifest = json.loads(paths.read_text(f"{directory}/4/{checkpoint.MANIFEST}"))
  assert manifest["checksum"] == "crc32c"
  listed = paths.walk_files(f"{directory}/4")
  assert {rel: size for rel, (size, _) in manifest["files"].items()} == {
      rel: size for rel, size in listed.items() if rel != checkpoint.MANIFEST}
  state, step = ckpt.restore_latest(small_state(0))
  ckpt.close()
  assert step == 4
  np.testing.assert_array_equal(state["w"], small_state(4)["w"])
  assert checkpoint.verify_all(directory) == [(2, None), (4, None)]


def largest_object(step_dir):
  files = paths.walk_files(step_dir)
  rel = max(files, key=files.get)
  return paths.join(step_dir, rel), files[rel]


@pytest.mark.parametrize("damage,expected", [
    (lambda data: data[:len(data) // 2], "is truncated"),
    (lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]), "is corrupted (its CRC-32C"),
])
def test_damaged_object_on_gcs_is_named(gcs_bucket, damage, expected):
  directory = f"{gcs_bucket}/run/checkpoints"
  checkpointer_with_steps(directory).close()
  victim, _ = largest_object(f"{directory}/4")
  paths.write_atomic(victim, damage(paths.read_bytes(victim)))  # replaced on the server
  ckpt = checkpoint.Checkpointer(directory, keep=3, every_steps=2)
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.restore_latest(small_state(0))
  message = str(e.value)
  assert message.startswith(f"checkpoint step 4 is damaged: {victim} {expected}"), message
  assert message.endswith(f"delete {directory}/4 to resume from step 2")
  ckpt.close()
  assert [s for s, p in checkpoint.verify_all(directory) if p] == [4]
