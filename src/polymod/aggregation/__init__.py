"""Forward-time aggregation: representation, input, output and parameter aggregation (see DESIGN.md)."""
