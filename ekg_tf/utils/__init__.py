"""Small shared utilities: atomic files, progress bars, CLI output, plots, context managers."""
