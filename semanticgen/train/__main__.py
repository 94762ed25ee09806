from semanticgen.train import main

raise SystemExit(main())
