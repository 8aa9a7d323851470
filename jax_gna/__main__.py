"""``python -m jax_gna``: see `jax_gna.cli`."""

from jax_gna.cli import main

raise SystemExit(main())
