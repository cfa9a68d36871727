"""Offline stand-ins for the real world: a tiny random SD3/SD3.5 pipeline, procedural scenes, and the demo."""
