"""Encoder-decoders (T5, mT5, Flan-T5, BART): the seq2seq objective and its data, prompt and prefix methods on
the encoder and the decoder (peft parity for prompts, a hand-built cache for prefixes), generation, and a
LoRA run of a tiny random T5 through the one loop that peft loads."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf
from peft import PeftModel, PromptTuningConfig, get_peft_model

import tunesmith
from helpers import alpaca_rows, rel_err, run_config, tiny, write_jsonl
from tunesmith import config as config_mod
from tunesmith.data.collate import collate
from tunesmith.data.seq2seq import source_target
from tunesmith.infer import generate
from tunesmith.methods import registry
from tunesmith.methods._virtual import new_cache
from tunesmith.methods.inject import disable_adapters
from tunesmith.models.compat import cache_kwargs
from tunesmith.train import objectives, runner

VOCAB = 512


def t5(family: str = "t5", seed: int = 1):
    return tiny(family, task="seq2seq", seed=seed, vocab_size=VOCAB).eval()


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    y = torch.randint(5, VOCAB, (2, 5), generator=g)
    y[1, 3:] = -100
    return {"input_ids": x, "attention_mask": mask, "decoder_labels": y}


def logits(model, b: dict) -> torch.Tensor:
    dec = model.prepare_decoder_input_ids_from_labels(labels=b["decoder_labels"])
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=dec).logits


def test_rows_map_onto_source_and_target():
    assert source_target({"instruction": "Summarize.", "input": "A long text.", "output": "Short."}, "alpaca") == \
        ("Summarize.\n\nA long text.", "Short.")
    one = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Text?"},
           {"role": "assistant", "content": "Sum."}]
    assert source_target({"messages": one}, "messages") == ("Be brief.\n\nText?", "Sum.")
    many = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert source_target({"messages": many}, "messages", system_prompt="S") == ("S\n\nuser: a\nassistant: b\nuser: c", "d")


def test_targets_get_their_own_padded_length():
    out = collate([{"input_ids": [5, 6, 7, 8], "decoder_labels": [9]}, {"input_ids": [5], "decoder_labels": [9, 10]}], 0)
    assert out["input_ids"].shape == (2, 4) and out["decoder_labels"].tolist() == [[9, -100], [9, 10]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_objective_is_the_models_own_label_loss_summed(family):
    model, b = t5(family), batch()
    loss, count, _ = objectives.get("seq2seq").loss(model, b)
    own = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["decoder_labels"]).loss
    assert count == 8 and abs(float(loss) / count - float(own)) < 1e-5


def test_auto_objective_follows_the_model_kind(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    for model, want in (("random:t5", "seq2seq"), ("random:bart", "seq2seq"), ("random:llama", "sft")):
        assert runner.resolve_objective(config_mod.load(run_config(f, tmp_path, {"name": "lora"}, model=model))) == want


def test_prompt_tuning_on_the_encoder_matches_peft(tmp_path):
    base = t5("flan-t5")
    ours = tunesmith.apply(copy.deepcopy(base), "prompt", num_virtual_tokens=4).eval()
    theirs = get_peft_model(copy.deepcopy(base), PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, num_transformer_submodules=1)).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.prompt_encoder.embedding.weight)
    b = batch()
    dec = base.prepare_decoder_input_ids_from_labels(labels=b["decoder_labels"])
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "decoder_input_ids": dec}
    with torch.no_grad():
        assert rel_err(ours(**kw).logits, theirs(**kw).logits) < 1e-5
        assert ours.get_encoder()(input_ids=b["input_ids"]).last_hidden_state.shape[1] == 4 + 9  # prompts kept
        out = ours.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=4,
                            do_sample=False)
        ref = theirs.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=4,
                              do_sample=False)
    assert torch.equal(out, ref)
    path = registry.attached(ours).save(ours, tmp_path, "unused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with torch.no_grad():
        assert rel_err(loaded(**kw).logits, ours(**kw).logits) < 1e-5


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_prefix_is_every_decoder_layers_own_self_attention_prefix(family):
    model = tunesmith.apply(t5(family), "ptuning_v2", num_virtual_tokens=3).eval()
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.normal_(0, 0.5)
    b = batch()
    dec = model.prepare_decoder_input_ids_from_labels(labels=b["decoder_labels"])
    enc = model.prompt_encoder
    s, n = enc.shape, 3
    kv = enc.table().detach().view(n, s["layers"] * 2, s["kv_heads"], s["head_dim"]).permute(1, 2, 0, 3)
    cache = new_cache(model)  # by hand: layer l's keys = slot 2l, values = slot 2l+1, in the self-attention half
    for layer in range(s["layers"]):
        cache.self_attention_cache.update(kv[2 * layer].expand(2, -1, -1, -1), kv[2 * layer + 1].expand(2, -1, -1, -1),
                                          layer)
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "decoder_input_ids": dec}
    with torch.no_grad():
        got = model(**kw).logits
        with disable_adapters(model):
            ref = model(**kw, **cache_kwargs(model, cache)).logits
            plain = model(**kw).logits
            encoded = model.get_encoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        assert rel_err(got, ref) < 1e-6 and rel_err(got, plain) > 1e-3
        # the encoder is untouched: transformers' encoders take no cache
        assert torch.equal(model.get_encoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                           .last_hidden_state, encoded.last_hidden_state)


def test_generate_reads_each_prompt_as_a_source():
    model = tiny("bart", task="seq2seq", seed=1).eval()  # the test tokenizer's whole vocabulary
    tok = tunesmith.models.loader.load_tokenizer(tunesmith.models.loader.ModelConfig(name_or_path="random:bart"))
    prompts = ["a short one", "a much longer prompt that the batch pads to"]
    both = generate(model, prompts, tokenizer=tok, max_new_tokens=4)
    alone = [generate(model, p, tokenizer=tok, max_new_tokens=4) for p in prompts]
    ids = torch.tensor([tok(prompts[1])["input_ids"]])
    direct = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert both == alone and alone[1] == tok.decode(direct[0, 1:], skip_special_tokens=True)


def test_lora_run_of_a_tiny_t5(tmp_path):
    """The one loop trains LoRA on T5 (objective auto → seq2seq); the adapter loads in peft; merging gives a
    plain T5 directory; generation works from the run and from the merged model."""
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(24))
    cfg = run_config(f, tmp_path, {"name": "lora", "r": 4}, model="random:t5", max_steps=8, lr=1e-2)
    cfg["data"]["val_split"] = 0.25
    run_dir, summary = tunesmith.train(cfg)
    assert config_mod.load(run_dir / "config.yaml").train.objective == "seq2seq"
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05
    ours, tok = tunesmith.load(run_dir, device="cpu")
    base = tiny("t5", task="seq2seq", seed=42)  # the run's base: random:t5 at the run's seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    b = batch()
    kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
          "decoder_input_ids": base.prepare_decoder_input_ids_from_labels(labels=b["decoder_labels"])}
    with torch.no_grad():
        assert rel_err(ours(**kw).logits, theirs(**kw).logits) < 1e-5
    answer = generate(run_dir, "Add 1 and 2.", max_new_tokens=5, device="cpu")
    merged = tunesmith.merge(run_dir, tmp_path / "merged")
    assert isinstance(tf.AutoModelForSeq2SeqLM.from_pretrained(merged), tf.T5ForConditionalGeneration)
    assert generate(merged, "Add 1 and 2.", max_new_tokens=5, device="cpu") == answer
