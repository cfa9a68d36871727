"""Paper stage (a), training: the rectified-flow objective and the accelerate loop around it.

- `objective`: `flow_matching_loss` (SD3's weighted rectified-flow loss, mask as a condition), `step_generator`,
  `mask_following_losses` (does a model follow its mask?), and `Objective`, what the loop needs of an objective;
- `reflow`: the reflow family on `python -m crfm.reflow`'s pairs (2-RF, k-SeqRF, distillation; `--reflow_pairs`);
- `build`: the run's objective (`objective_for`), the accelerator, data, models and optimizer of a run;
- `checkpoints`: atomic accelerate checkpoints holding only the trained weights, resume;
- `train`: the command line (`train.py`, `python -m crfm.training.train`) and the loop.
"""
