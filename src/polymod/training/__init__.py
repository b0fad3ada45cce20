"""polymod.training (see DESIGN.md)."""
