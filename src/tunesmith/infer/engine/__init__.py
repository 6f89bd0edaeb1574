"""The generation engine shared by ``tunesmith chat``, ``tunesmith serve``, evaluation and rollouts.

    from tunesmith.infer.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer)                       # anything tunesmith.load returns
    engine.add_adapter("support", "runs/support")           # LoRA runs: per row on the same base
    out = engine.generate(["Hello"], params=SamplingParams(max_tokens=32), model="support")

See docs/serving.md for the whole API.
"""
from .core import Engine, EngineBusy, EngineStopped, RequestError, UnknownModel
from .sampling import SamplingParams
from .sequence import Completion, Handle, Output, Request

__all__ = ["Engine", "EngineBusy", "EngineStopped", "RequestError", "UnknownModel", "SamplingParams", "Completion", "Handle",
           "Output", "Request"]
