"""The generation engine on the plain path: greedy tokens equal transformers' ``generate`` for every
registered method (virtual tokens included), rows joining a running batch, proxy-tuning, stop
strings, streaming, EOS / end-of-turn tokens, errors, cancellation and the background thread."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

import tunesmith
from additive_helpers import VOCAB, perturb, small
from helpers import ids
from tunesmith.data.chat import IGNORE, ChatRenderer
from tunesmith.errors import TunesmithError
from tunesmith.infer import ProxyTuned
from tunesmith.infer.engine import Engine, EngineBusy, EngineStopped, Request, RequestError, SamplingParams, UnknownModel
from tunesmith.infer.engine.text import Prompter, TextStream, stop_token_ids
from tunesmith.infer.generate import prompt_ids
from tunesmith.infer.proxy import Sampler
from tunesmith.methods import registry


def _causal_case(cls):
    return next((c for c in cls.invariant_cases if c.get("task", "causal_lm") == "causal_lm"), None)


METHODS = [n for n, c in registry.all_methods().items() if _causal_case(c) is not None and n != "qlora"]


def _prompts(seed: int = 3):
    x = ids(3, 9, vocab=VOCAB, seed=seed).tolist()
    return [x[0][:4], x[1], x[2][:6]]


def _hf_greedy(model, prompt, n):
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _submit_all(engine, prompts, lengths, model=None):
    hs = [engine.submit(Request(prompt=p, model=model, params=SamplingParams(max_tokens=n, ignore_eos=True)))
          for p, n in zip(prompts, lengths)]
    engine.run_until_done()
    return [h.result().token_ids for h in hs]


@pytest.mark.parametrize("name", METHODS)
def test_greedy_equals_hf_generate_for_every_method(name, tokenizer):
    case = _causal_case(registry.get(name))
    model = tunesmith.apply(small(case.get("arch", "llama")), name, **case.get("options", {}))
    perturb(model, scale=0.2)
    model.eval()
    engine = Engine(model, tokenizer, max_batch=2, fast=False)
    lengths = [3, 7, 5]   # the third request joins while the second is still decoding
    got = _submit_all(engine, _prompts(), lengths)
    for p, n, g in zip(_prompts(), lengths, got):
        assert g == _hf_greedy(model, p, n)
    lane = engine.routes["base"].lane
    assert lane.max_rows == 2 and lane.steps < sum(lengths) - 2  # batched, not one request after another


def test_rows_join_and_leave_mid_flight(tokenizer):
    model = small()
    engine = Engine(model, tokenizer, max_batch=3, fast=False)
    prompts = _prompts(5) + [ids(1, 2, vocab=VOCAB, seed=9)[0].tolist()]
    first = [engine.submit(Request(prompt=p, params=SamplingParams(max_tokens=n, ignore_eos=True)))
             for p, n in zip(prompts[:2], (2, 9))]
    engine.step()
    engine.step()                     # the 2-token request is done, the 9-token one is running
    late = [engine.submit(Request(prompt=p, params=SamplingParams(max_tokens=4, ignore_eos=True))) for p in prompts[2:]]
    engine.run_until_done()
    for h, p in zip(first + late, prompts):
        assert h.result().token_ids == _hf_greedy(model, p, len(h.result().token_ids))


def test_proxy_tuning_lane_equals_proxytuned(tokenizer):
    base, expert, anti = small(seed=1), small(seed=2), small(seed=3)
    tunesmith.apply(expert, "prompt", num_virtual_tokens=3)
    perturb(expert)
    engine = Engine(base, tokenizer, fast=False)
    engine.add_proxy("proxy", expert, anti, alpha=0.7)
    got = _submit_all(engine, _prompts(), [5, 5, 5], model="proxy")
    proxy = ProxyTuned(base, expert, anti, 0.7)
    for p, g in zip(_prompts(), got):
        x = torch.tensor([p])
        want = proxy.generate(x, torch.ones_like(x), max_new_tokens=5, sampler=Sampler(), eos_token_id=None,
                              pad_token_id=0)
        assert g == want[0, len(p):].tolist()


def test_chat_prompts_are_the_training_layout(tokenizer):
    p = Prompter(tokenizer)
    assert p.chat([{"role": "user", "content": "Add 1 and 2."}]) == prompt_ids(tokenizer, "Add 1 and 2.", True)
    assert p.completion("hi") == prompt_ids(tokenizer, "hi", False)
    two = p.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                  {"role": "user", "content": "more"}])
    assert tokenizer.decode(two).replace(" ", "") == "user:hiassistant:yo[SEP]user:moreassistant:"
    sys_first = Prompter(tokenizer, system_prompt="Be brief.").chat([{"role": "user", "content": "hi"}])
    ids_, labels = ChatRenderer(tokenizer, "Be brief.").alpaca({"instruction": "hi", "input": "", "output": "x"})
    assert sys_first == [i for i, lab in zip(ids_, labels) if lab == IGNORE]   # what training masked


def _chatml(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_end_of_turn_token_comes_from_the_training_template(tokenizer):
    tok = _chatml(tokenizer)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_start|>") not in stop_token_ids(tok)
    assert stop_token_ids(tokenizer) == {tokenizer.sep_token_id}   # no template: the EOS training appends
    rendered = Prompter(tok, system_prompt="S").chat([{"role": "user", "content": "hi"}])
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert rendered == tok(text, add_special_tokens=False)["input_ids"]


def test_stop_token_ends_the_answer_without_its_text(tokenizer):
    model = small()
    engine = Engine(model, tokenizer, fast=False)
    p = _prompts()[1]
    free = engine.generate([p], params=SamplingParams(max_tokens=6, ignore_eos=True))[0]
    stop = free.token_ids[2]
    got = engine.generate([p], params=SamplingParams(max_tokens=6, stop_token_ids=(stop,)))[0]
    assert got.finish_reason == "stop" and got.token_ids == free.token_ids[:free.token_ids.index(stop) + 1]
    assert got.text == tokenizer.decode(got.token_ids[:-1], skip_special_tokens=True)


def test_streamed_text_is_the_whole_text(tokenizer):
    engine = Engine(small(), tokenizer, fast=False)
    for stop in ((), ("zzz",)):
        sp = SamplingParams(max_tokens=7, ignore_eos=True, stop=stop)
        h = engine.submit(Request(prompt=_prompts()[0], stream=True, params=sp))
        engine.run_until_done()
        assert "".join(d.text for d in h) == h.result().text != ""


def test_stop_strings_cut_the_text_and_the_stream_never_shows_them(tokenizer):
    model = small()
    engine = Engine(model, tokenizer, fast=False)
    p = _prompts()[0]
    free = engine.generate([p], params=SamplingParams(max_tokens=12, ignore_eos=True))[0].text
    words = free.split()
    stop = " ".join(words[2:4])
    h = engine.submit(Request(prompt=p, stream=True, params=SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,))))
    engine.run_until_done()
    deltas = list(h)
    res = h.result()
    assert res.finish_reason == "stop" and res.text == free[:free.index(stop)]
    assert "".join(d.text for d in deltas) == res.text and len(deltas) > 2
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert sum(len(d.token_ids) for d in deltas) == len(res.token_ids)


def test_text_stream_holds_back_a_possible_stop_string(tokenizer):
    s = TextStream(tokenizer, stop=("xyz",))
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert s.push(enc("hello x")) == ("hello ", False)       # "x" may start "xyz"
    assert s.push(enc("hello xa")) == ("xa", False)
    assert s.push(enc("hello xa xy")) == (" ", False)
    assert s.push(enc("hello xa xyz more")) == ("", True) and s.text == "hello xa "


def test_request_errors(tokenizer):
    engine = Engine(small(), tokenizer, fast=False, max_len=16, max_queue=2)
    with pytest.raises(UnknownModel, match="available: base"):
        engine.submit(Request(prompt=[5, 6], model="nope"))
    with pytest.raises(RequestError, match="max_len of 16"):
        engine.submit(Request(prompt=list(range(5, 15)), params=SamplingParams(max_tokens=8)))
    with pytest.raises(RequestError, match="exactly one"):
        engine.submit(Request())
    with pytest.raises(TunesmithError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="token id 600 is outside"):
        engine.submit(Request(prompt=[5, 600], params=SamplingParams(max_tokens=2)))
    for _ in range(2):
        engine.submit(Request(prompt=[5, 6], params=SamplingParams(max_tokens=2)))
    with pytest.raises(EngineBusy, match="max_queue=2"):
        engine.submit(Request(prompt=[5, 6], params=SamplingParams(max_tokens=2)))
    engine.run_until_done()
    assert engine.load == {"running": 0, "waiting": 0}


def test_models_it_cannot_decode_are_refused(tokenizer):
    from helpers import tiny
    with pytest.raises(TunesmithError, match="no language-model head"):
        Engine(tiny("bert", task="classification"), tokenizer)


def test_a_failing_step_fails_its_rows_only(tokenizer, monkeypatch):
    model = small()
    engine = Engine(model, tokenizer, fast=False)
    runner = engine.routes["base"].lane.runner
    real = runner.decode
    monkeypatch.setattr(runner, "decode", lambda last: (_ for _ in ()).throw(RuntimeError("boom")))
    bad = engine.generate([_prompts()[0]], params=SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert bad.finish_reason == "error" and "boom" in bad.error
    monkeypatch.setattr(runner, "decode", real)
    ok = engine.generate([_prompts()[0]], params=SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert ok.token_ids == _hf_greedy(model, _prompts()[0], 4)


def test_background_thread_serves_concurrent_callers_and_cancels(tokenizer):
    model = small()
    engine = Engine(model, tokenizer, fast=False, max_batch=4).start()
    try:
        results = {}

        def call(i, p):
            results[i] = engine.generate([p], params=SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids
        threads = [threading.Thread(target=call, args=(i, p)) for i, p in enumerate(_prompts())]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for i, p in enumerate(_prompts()):
            assert results[i] == _hf_greedy(model, p, 5)
        h = engine.submit(Request(prompt=_prompts()[0], params=SamplingParams(max_tokens=400, ignore_eos=True)))
        h.cancel()
        assert h.result(timeout=30).finish_reason == "cancelled"
    finally:
        engine.shutdown()
    with pytest.raises(EngineStopped, match="shutting down"):
        engine.submit(Request(prompt=[5, 6]))


def test_text_stream_decodes_only_the_new_ids_and_equals_the_whole_decode():
    """Byte-level BPE (the embedded SmolLM2's tokenizer) splits é, 日 and 🎉 over several ids: the
    stream holds each back until it is whole, its deltas add up to the decode of all the ids, a
    character cut at the end comes out as U+FFFD, and each push decodes a few ids, not all of them."""
    from tunesmith.config import ModelConfig
    from tunesmith.models.loader import load_tokenizer
    tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    ids = tok("naïve café 日本語 🎉 done. " * 40, add_special_tokens=False)["input_ids"]
    decoded = []
    real = tok.decode
    tok.decode = lambda x, **kw: (decoded.append(len(x)), real(x, **kw))[1]
    s = TextStream(tok)
    deltas = [s.push(ids[:n])[0] for n in range(1, len(ids) + 1)]
    assert "".join(deltas) + s.flush() == real(ids, skip_special_tokens=True)
    assert "\ufffd" not in "".join(deltas) and max(decoded) <= 8 < len(ids)
    cut = TextStream(tok)
    for n in range(1, 5):                      # "naïve café " then the first byte of 日
        cut.push(ids[:n])
    assert cut.finish() == "naïve café \ufffd"
