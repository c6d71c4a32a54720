from difflineage.cli import main

raise SystemExit(main())
