"""`python -m crfm.make_index`: the documented command; the code lives in `crfm.data.make_index`."""

from crfm.data.make_index import main

if __name__ == "__main__":
    raise SystemExit(main())
