"""Shared plumbing: command-line flags and errors, atomic file writes, plots and image grids."""
