from serve_config.fleet.cli import main

raise SystemExit(main())
