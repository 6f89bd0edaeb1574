"""Generation: after training, ``model.generate`` (KV cache, left padding, batches) gives the
same tokens as a greedy loop without cache that builds the inputs by hand; ``tunesmith``'s
generate on a run directory; prompt rendering."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import tunesmith
from additive_helpers import VOCAB, curve, lm_batches, small
from helpers import alpaca_rows, ids, run_config, write_jsonl
from tunesmith.infer import generate
from tunesmith.infer.generate import prompt_ids
from tunesmith.methods.inject import disable_adapters
from tunesmith.models.compat import cache_kwargs

STEPS = 6
OPTIONS = {"prompt": {"num_virtual_tokens": 4}, "ptuning": {"num_virtual_tokens": 4, "encoder_hidden": 16},
           "prefix": {"num_virtual_tokens": 4, "reparam_hidden": 16}, "ptuning_v2": {"num_virtual_tokens": 4},
           "adapter": {"reduction_factor": 8}, "ia3": {}}


def _inputs_by_hand(model, out, mask):
    """Full-sequence inputs with the method's virtual tokens built explicitly (hooks off)."""
    enc = getattr(model, "prompt_encoder", None)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    if enc is None:
        return {"input_ids": out, "attention_mask": mask, "position_ids": pos}
    n, B = enc.num_virtual_tokens, out.shape[0]
    table = enc.table().detach()
    full_mask = torch.cat([torch.ones(B, n, dtype=mask.dtype), mask], 1)
    if enc.input_level:  # [P; E(x)] with positions 0..n-1 for P
        emb = torch.cat([table.expand(B, -1, -1), model.get_input_embeddings()(out)], 1)
        pos = torch.cat([torch.arange(n).expand(B, n), pos + n], 1)
        return {"inputs_embeds": emb, "attention_mask": full_mask, "position_ids": pos}
    s = enc.shape  # per layer l: keys = slot 2l, values = slot 2l+1
    kv = table.view(n, s["layers"] * 2, s["kv_heads"], s["head_dim"]).permute(1, 2, 0, 3)
    cache = DynamicCache(config=model.config)
    for layer in range(s["layers"]):
        cache.update(kv[2 * layer].expand(B, -1, -1, -1), kv[2 * layer + 1].expand(B, -1, -1, -1), layer)
    return {"input_ids": out, "attention_mask": full_mask, "position_ids": pos + n, **cache_kwargs(model, cache)}


def reference_greedy(model, x, mask, steps):
    out, mask = x.clone(), mask.clone()
    with disable_adapters(model) if hasattr(model, "prompt_encoder") else torch.no_grad(), torch.no_grad():
        for _ in range(steps):
            nxt = model(**_inputs_by_hand(model, out, mask)).logits[:, -1].argmax(-1, keepdim=True)
            out, mask = torch.cat([out, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_generate_equals_reference_loop(name, arch):
    model = tunesmith.apply(small(arch), name, **OPTIONS[name])
    curve(model, lm_batches(), steps=3, lr=5e-2)  # train a little
    model.eval()
    x = ids(3, 7, vocab=VOCAB, seed=5)
    mask = torch.ones_like(x)
    x[0, :3], mask[0, :3] = 0, 0  # left padding
    x[1, :1], mask[1, :1] = 0, 0
    got = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    assert torch.equal(got, reference_greedy(model, x, mask, STEPS))


def test_generate_from_a_run_directory(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))
    cfg = run_config(f, tmp_path, {"name": "prefix", "num_virtual_tokens": 4}, max_steps=1)
    run_dir, _ = tunesmith.train(cfg)
    texts = generate(run_dir, ["Add 1 and 2.", "Add 30 and 4."], max_new_tokens=5, device="cpu")
    model, tok = tunesmith.load(run_dir, device="cpu")
    ids_ = torch.tensor([prompt_ids(tok, "Add 30 and 4.", None)])
    direct = model.generate(input_ids=ids_, attention_mask=torch.ones_like(ids_), max_new_tokens=5,
                            do_sample=False, pad_token_id=tok.pad_token_id)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts[1] == tok.decode(direct[0, ids_.shape[1]:], skip_special_tokens=True)
    one = generate(model, "Add 30 and 4.", tokenizer=tok, max_new_tokens=5)
    assert one == texts[1]  # a loaded model works too, and padding does not change the answer
    a = generate(model, "Add 1 and 2.", tokenizer=tok, max_new_tokens=5, do_sample=True, seed=3)
    assert a == generate(model, "Add 1 and 2.", tokenizer=tok, max_new_tokens=5, do_sample=True, seed=3)


def test_chat_prompt_without_template_is_the_training_layout(tokenizer):
    rendered = tokenizer.decode(prompt_ids(tokenizer, "Add 1 and 2.", True)).lower().replace(" ", "")
    assert rendered == "###instruction:add1and2.###response:"
    assert prompt_ids(tokenizer, "hi", None) == tokenizer("hi")["input_ids"]
