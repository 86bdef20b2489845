from reftlens.cli import main

raise SystemExit(main())
