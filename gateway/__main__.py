"""`python -m gateway` is `mailedge`."""

from gateway.cli import main

raise SystemExit(main())
