"""`python -m crfm.demo`: the documented command; the code lives in `crfm.toy.demo`."""

from crfm.toy.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
