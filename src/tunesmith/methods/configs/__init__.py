"""Method configs: one module per method, the pydantic model of its YAML `method:` section.

These modules import neither torch nor transformers (only pydantic and the registry's base
class), so that a config is validated before anything heavy is loaded. Each config is registered
with ``@register_config`` and states its method's ``family`` and one-line ``summary``.
"""
