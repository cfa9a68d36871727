"""Paper stage (a), model: SD3's MM-DiT with a mask branch, its conditioning inputs and trained-weight checkpoints."""
