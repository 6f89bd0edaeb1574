"""`tunesmith ui`: a browser UI on the FastAPI server of `tunesmith serve` (see docs/ui.md).

``app.create_app`` serves the page (``static/``, package data: plain HTML and JavaScript, no build
step) and the JSON API it calls: ``schema`` (the config's pydantic JSON schema, the form's only
source), ``jobs`` (`tunesmith train` subprocesses: start, stop, resume, progress), ``runs`` (what is
under the runs directory), ``chat`` (engines of the serving issue, one per base model, reached through
their own OpenAI-compatible routes) and ``tools`` (export, merge, and the commands the Evaluate tab
and `estimate` / `compare` call).
"""
