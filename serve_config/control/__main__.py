from serve_config.control.cli import main

raise SystemExit(main())
