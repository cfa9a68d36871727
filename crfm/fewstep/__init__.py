"""Few-step synthesis, a stage beside the paper's three: teacher pairs, students trained on them, and how straight
and how faithful few-step sampling is.

- `pairs`: reflow pairs, the trained (optionally CRFM-guided) flow's noise → latent couplings (`python -m crfm.reflow`);
- `pair_dataset`: the pairs read back for training (their record, segment boundaries, `ReflowPairs`); the loss on
  them, 2-rectified flow, k-SeqRF and distillation, is `training/reflow.py` (`train.py --reflow_pairs`);
- `straightness`: S_K of a flow along its own sampling paths;
- `evaluate`: judge fidelity, NFE, images/s and straightness per sampler run (`python -m crfm.evaluate_sampling`).
"""
