"""`python -m crfm.toydata`: the documented command; the code lives in `crfm.toy.toydata`."""

from crfm.toy.toydata import main

if __name__ == "__main__":
    raise SystemExit(main())
