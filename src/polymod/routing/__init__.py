"""polymod.routing (see DESIGN.md)."""
