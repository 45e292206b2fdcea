"""The kNN monitor's subsets against the whole splits, on one checkpoint of a workdir.

  python benchmarks/knn_subsets.py WORKDIR [--step S] [--sizes 5000:2000,20000:5000]

Encodes the whole training and test splits once with the checkpoint's encoder (cls
features, as the monitor), then scores kNN top-1 (k=20, T=0.07) with the whole training
split as the memory bank over the whole test split, and with each BANK:TEST pair of
seeded subsets the monitor would draw (evaluation.knn.seeded_subset with the run's seed).
One line per setting: bank size, test size, top-1, its difference from the whole splits'.
"""
import argparse

import ml_collections
import numpy as np

from mae_jax import data
from mae_jax.evaluation import features, knn
from mae_jax.train import pretrained, sharding


def subset_rows(n, size, seed, stream):
  """The indices evaluation.knn.seeded_subset keeps of a split of n examples."""
  if size is None or size >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng([seed, stream]).choice(n, size, replace=False))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step; default the latest")
  p.add_argument("--sizes", default="5000:2000,20000:5000", help="BANK:TEST pairs")
  p.add_argument("--batch_size", type=int, default=512)
  args = p.parse_args(argv)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  pre = pretrained.load(args.workdir, args.step, mesh)
  config = pre.config
  train_src, test_src = (data.load_source(config.data, s) for s in ("train", "test"))
  kw = dict(model=pre.model, kind=knn.MONITOR_FEATURES, mesh=mesh,
            image_size=config.data.image_size, batch_size=args.batch_size, log=print)
  train = features.extract(pre.params, train_src, what="train features", **kw)
  test = features.extract(pre.params, test_src, what="test features", **kw)
  score = lambda tr, te: knn.knn_top1(
      tr, te, k=knn.MONITOR_K, temperature=knn.MONITOR_TEMPERATURE,
      num_classes=train_src.num_classes, mesh=mesh, batch_size=args.batch_size)
  whole = score(train, test)
  print(f"{pre.description}: bank {len(train[0])}, test {len(test[0])}: top-1 {whole:.4f}")
  for pair in args.sizes.split(","):
    bank, n_test = map(int, pair.split(":"))
    rows_b = subset_rows(len(train[0]), bank, config.seed, knn.BANK_STREAM)
    rows_t = subset_rows(len(test[0]), n_test, config.seed, knn.TEST_STREAM)
    top1 = score((train[0][rows_b], train[1][rows_b]), (test[0][rows_t], test[1][rows_t]))
    print(f"bank {len(rows_b)}, test {len(rows_t)}: top-1 {top1:.4f} "
          f"({top1 - whole:+.4f} against the whole splits)")


if __name__ == "__main__":
  main()
