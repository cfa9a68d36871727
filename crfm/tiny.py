"""`python -m crfm.tiny`: the documented command; the code lives in `crfm.toy.tiny`."""

from crfm.toy.tiny import main

if __name__ == "__main__":
    raise SystemExit(main())
