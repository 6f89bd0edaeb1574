"""Generated answers through the engine (:mod:`tunesmith.infer.engine`), rendered with the chat template
the model was trained with, greedy, against the reference answers."""
from __future__ import annotations

from tqdm.auto import tqdm

from ..errors import ConfigError


def split_row(row: dict, fmt: str) -> tuple[list[dict], str]:
    """(the conversation up to the answer, the reference answer) of an alpaca or messages row."""
    if fmt == "alpaca":
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        return [{"role": "user", "content": user}], row["output"]
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if last == 0:
        raise ConfigError("a messages row must have a user turn before its last assistant turn to be evaluated")
    return [dict(m) for m in msgs[:last]], msgs[last]["content"]


def generate_answers(inp, conversations: list[list[dict]], desc: str = "generate") -> list[str]:
    """Greedy answers to ``conversations`` (each ending with a user turn), ``inp.batch_size`` at a time."""
    from ..infer.engine import Engine, SamplingParams
    model = inp.model.eval()
    params = SamplingParams(max_tokens=inp.max_new_tokens, temperature=0.0)
    bar = tqdm(total=len(conversations), desc=desc, unit="row", disable=not inp.progress, dynamic_ncols=True)
    seq2seq = getattr(model.config, "is_encoder_decoder", False)   # the source as seq2seq training reads it
    engine = Engine(model, inp.tokenizer, max_batch=inp.batch_size, system_prompt=inp.system_prompt,
                    layout=inp.layout)
    out = []
    step = inp.batch_size * 4
    for i in range(0, len(conversations), step):
        chunk = conversations[i:i + step]
        done = (engine.generate(["\n\n".join(m["content"] for m in c) for c in chunk], params=params) if seq2seq
                else engine.generate(messages=chunk, params=params))
        bad = next((c for c in done if c.finish_reason == "error"), None)
        if bad is not None:
            raise ConfigError(f"generation failed: {bad.error}")
        out += [c.text for c in done]
        bar.update(len(done))
    bar.close()
    return out


def predict_generation(inp) -> list[dict]:
    pairs = [split_row(r, inp.fmt) for _, r in inp.rows]
    shots = []
    for _, r in inp.demos or []:
        convo, answer = split_row(r, inp.fmt)
        shots += [*convo, {"role": "assistant", "content": answer}]
    answers = generate_answers(inp, [shots + convo for convo, _ in pairs])
    return [{"loc": loc, "prompt": convo[-1]["content"], "reference": ref, "prediction": a}
            for (loc, _), (convo, ref), a in zip(inp.rows, pairs, answers)]
