"""Every decoder family tunesmith loads (models/families.py) decodes on the engine with the greedy
tokens of transformers' ``generate``, rows joining and leaving mid-flight: on the plain path always,
on the fast path where it takes the model (else it says why)."""
from __future__ import annotations

import pytest
import torch

from helpers import ids, tiny
from tunesmith.infer.engine import Engine, Request, SamplingParams
from tunesmith.infer.engine.fast import fast_path_refusal
from tunesmith.models.families import of_kind

VOCAB = 512


def _hf(model, prompt, n):
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", [f.name for f in of_kind("decoder")])
def test_every_decoder_family(family, tokenizer):
    model = tiny(family, vocab_size=VOCAB).eval()
    x = ids(3, 30, vocab=VOCAB, seed=3).tolist()
    prompts, lengths = [x[0][:10], x[1], x[2][:20]], [30, 12, 25]   # past a 32-token sliding window
    want = [_hf(model, p, n) for p, n in zip(prompts, lengths)]
    why = fast_path_refusal(model)
    for fast in (False, True) if why is None else (False,):
        engine = Engine(model, tokenizer, fast=fast, max_batch=2, max_len=64)   # the third joins later
        hs = [engine.submit(Request(prompt=p, params=SamplingParams(max_tokens=n, ignore_eos=True)))
              for p, n in zip(prompts, lengths)]
        engine.run_until_done()
        assert [h.result().token_ids for h in hs] == want, ("fast" if fast else "plain")
    if why is not None:
        with pytest.raises(ValueError, match="fast path does not take"):
            Engine(model, tokenizer, fast=True)
