"""`python -m crfm.reflow`: the documented command; the code lives in `crfm.sampling.reflow_pairs`."""

from crfm.sampling.reflow_pairs import main

if __name__ == "__main__":
    raise SystemExit(main())
