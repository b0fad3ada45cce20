"""polymod.aggregation (see DESIGN.md)."""
