"""`python -m crfm.evaluate_sampling`: the documented command; the code lives in `crfm.fewstep.evaluate`."""

from crfm.fewstep.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
