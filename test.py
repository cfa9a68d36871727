"""Synthesize image-mask pairs with flow-matching sampling and CRFM (stage (b)). Arrives with issue #4."""

import sys

if __name__ == "__main__":
    sys.exit(
        "test.py is not implemented yet: sampling, CRFM and dataset synthesis come with issue #4. "
        "Available now: python -m crfm.tiny, python -m crfm.toydata, preprocess/vectorize.py."
    )
