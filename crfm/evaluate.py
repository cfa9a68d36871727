"""`python -m crfm.evaluate`: the documented command; the code lives in `crfm.segmentation.evaluate`."""

from crfm.segmentation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
