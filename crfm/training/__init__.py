"""Paper stage (a), training: the rectified-flow objective and the accelerate loop around it.

- `objective`: `flow_matching_loss` (SD3's weighted rectified-flow loss, mask as a condition), `step_generator`,
  `mask_following_losses` (does a model follow its mask?);
- `build`: the accelerator, data, models and optimizer of a run;
- `checkpoints`: atomic accelerate checkpoints holding only the trained weights, resume;
- `train`: the command line (`train.py`, `python -m crfm.training.train`) and the loop.
"""
