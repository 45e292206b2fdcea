"""Evaluation of an MAE encoder (paper Sec. 4, A.2-A.3): kNN, linear probe and fine-tuning
(jobs on the one loop, mae_jax.train.loop), the pretraining monitors and their pictures.
`python -m mae_jax.evaluate` is the command line; docs/evaluation.md describes each mode.
"""
