"""Strict black-box access (``model.access: prompt``): copies are learned discrete prompts."""
