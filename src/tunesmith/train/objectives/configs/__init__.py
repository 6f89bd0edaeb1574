"""Each objective's pydantic config (its ``objective:`` section and what it needs), without torch."""
