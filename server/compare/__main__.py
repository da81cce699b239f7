from server.compare.cli import main

raise SystemExit(main())
