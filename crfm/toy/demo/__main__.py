from crfm.toy.demo import main

raise SystemExit(main())
