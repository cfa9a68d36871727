"""`python -m crfm.evaluate_sampling`: the documented command; the code lives in `crfm.sampling.evaluate_sampling`."""

from crfm.sampling.evaluate_sampling import main

if __name__ == "__main__":
    raise SystemExit(main())
