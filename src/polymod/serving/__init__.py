"""polymod.serving (see DESIGN.md)."""
