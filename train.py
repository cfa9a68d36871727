"""Fine-tune SD3's MM-DiT with a mask branch (stage (a) of the paper). Arrives with issue #3."""

import sys

if __name__ == "__main__":
    sys.exit(
        "train.py is not implemented yet: the mask-conditioned MM-DiT and its accelerate training come with "
        "issue #3. Available now: python -m crfm.tiny, python -m crfm.toydata, preprocess/vectorize.py."
    )
