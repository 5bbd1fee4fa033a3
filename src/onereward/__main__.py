from onereward.cli import main

raise SystemExit(main())
