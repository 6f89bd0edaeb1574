"""Strategy configs, one file each (pydantic only)."""
