"""Recipes: ready-to-run fine-tunes for common domains (data builders, runner, report)."""
