"""The OpenAI-compatible server (FastAPI + uvicorn) over the generation engine; ``tunesmith serve``."""
