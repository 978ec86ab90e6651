"""Statuses, errors, input validation and defaults shared by every layer."""
