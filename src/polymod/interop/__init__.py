"""polymod.interop (see DESIGN.md)."""
