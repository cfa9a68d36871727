"""Paper stage (a), training: the rectified-flow objective and the accelerate loop around it."""
