"""Everything that spans processes: shared contracts, pools, transport, CLI."""
