"""`python -m crfm.reflow`: the documented command; the code lives in `crfm.fewstep.pairs`."""

from crfm.fewstep.pairs import main

if __name__ == "__main__":
    raise SystemExit(main())
