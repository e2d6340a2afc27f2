"""Command-line declarations shared by every layer (imports nothing from the project)."""
