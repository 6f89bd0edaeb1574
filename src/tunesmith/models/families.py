"""The architecture families tunesmith covers, and a tiny random configuration of each (data, not code).

Each entry names a family as ``random:<name>`` accepts it: the transformers ``model_type`` its config
is built with (transformers' own config classes, no download), its kind — ``decoder`` (causal LM),
``encoder`` (classification) or ``seq2seq`` (encoder-decoder) — and the config fields of a tiny,
randomly initialised model (two layers, width 64) for tests. The coverage matrix
(tests/test_coverage.py) and the support table in docs/models.md iterate this table; target-module
defaults per ``model_type`` are in :mod:`tunesmith.models.targets`.

Special token ids follow the test tokenizer (the embedded MiniLM's WordPiece vocabulary: [PAD] 0,
[CLS] 101, [SEP] 102), so that every family's ids fall inside a small test vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("decoder", "encoder", "seq2seq")
#: What each kind trains for, as a load_model task.
TASK_OF_KIND = {"decoder": "causal_lm", "encoder": "classification", "seq2seq": "seq2seq"}

_IDS = dict(pad_token_id=0, bos_token_id=101, eos_token_id=102)
_DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, tie_word_embeddings=False, **_IDS)
_GQA = dict(_DEC, num_key_value_heads=2)
_MOE = dict(_GQA, num_experts_per_tok=2)
_T5 = dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, decoder_start_token_id=0, **_IDS)


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    kind: str
    config: dict = field(default_factory=dict)
    #: What the family stands for (the models people know by name).
    covers: str = ""

    @property
    def task(self) -> str:
        return TASK_OF_KIND[self.kind]


FAMILIES: dict[str, Family] = {f.name: f for f in [
    # the three original test models keep their exact configs
    Family("llama", "llama", "decoder", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False), "Llama 2/3, Mistral, SmolLM"),
    Family("qwen2", "qwen2", "decoder", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False), "Qwen 2 / 2.5"),
    Family("qwen3", "qwen3", "decoder", dict(_GQA, head_dim=16), "Qwen 3"),
    Family("gemma2", "gemma2", "decoder", dict(_GQA, head_dim=16, sliding_window=32), "Gemma 2"),
    Family("gemma3", "gemma3_text", "decoder", dict(_GQA, head_dim=16, sliding_window=32), "Gemma 3 (text)"),
    Family("phi", "phi", "decoder", dict(_DEC), "Phi-1.5, Phi-2"),
    Family("phi3", "phi3", "decoder", dict(_GQA, original_max_position_embeddings=512), "Phi-3, Phi-4"),
    Family("gpt2", "gpt2", "decoder", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, **_IDS),
           "GPT-2, DistilGPT2 (Conv1D layers)"),
    Family("bloom", "bloom", "decoder", dict(hidden_size=64, n_layer=2, n_head=4, **_IDS), "BLOOM, BLOOMZ"),
    Family("falcon", "falcon", "decoder", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **_IDS),
           "Falcon"),
    Family("gpt_neox", "gpt_neox", "decoder", dict(_DEC), "GPT-NeoX, Pythia"),
    Family("mixtral", "mixtral", "decoder", dict(_MOE, num_local_experts=4), "Mixtral, Mistral MoE"),
    Family("qwen2_moe", "qwen2_moe", "decoder", dict(
        _MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64), "Qwen1.5/2-MoE"),
    Family("qwen3_moe", "qwen3_moe", "decoder", dict(_MOE, head_dim=16, num_experts=4, moe_intermediate_size=32),
           "Qwen 3 MoE"),
    Family("bert", "bert", "encoder", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512), "BERT, RoBERTa, ELECTRA, MiniLM"),
    Family("deberta-v2", "deberta-v2", "encoder", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, pad_token_id=0), "DeBERTa-v2, DeBERTa-v3"),
    Family("modernbert", "modernbert", "encoder", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101,
        eos_token_id=102, global_attn_every_n_layers=2, local_attention=16), "ModernBERT"),
    Family("t5", "t5", "seq2seq", dict(_T5, feed_forward_proj="relu"), "T5 (v1.0)"),
    Family("flan-t5", "t5", "seq2seq", dict(_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
           "T5 v1.1, Flan-T5, T0 (gated feed-forward)"),
    Family("mt5", "mt5", "seq2seq", dict(_T5, tie_word_embeddings=False), "mT5, mT0"),
    Family("bart", "bart", "seq2seq", dict(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512, decoder_start_token_id=102,
        forced_eos_token_id=None, **_IDS), "BART, mBART-style"),
]}


def family(name: str) -> Family | None:
    return FAMILIES.get(name)


def of_kind(kind: str) -> list[Family]:
    return [f for f in FAMILIES.values() if f.kind == kind]
