"""Builds the tiny random Llama-style model the vLLM end-to-end tests serve.

No download: the weights are drawn from a fixed seed and the tokenizer is a word-level
vocabulary built here, so every machine builds the same model. Usage::

    python make_model.py OUT_DIR

The model: 2 layers, hidden size 256, 4 attention heads of head_dim 64 (2 KV heads), float32,
a vocabulary of 1,000 words ``w0``..``w996`` plus ``<unk>``, ``<s>``, ``</s>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOCAB_WORDS = 997
HIDDEN = 256
HEADS = 4
KV_HEADS = 2
LAYERS = 2
#: Bumped whenever the model changes, so a cached build is rebuilt.
MODEL_REVISION = "1"


def build(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    marker = out / "kvloft-model-revision"
    if marker.exists() and marker.read_text() == MODEL_REVISION:
        return out
    out.mkdir(parents=True, exist_ok=True)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(VOCAB_WORDS):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=4096
    )
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        # Large weights make the logits decisive, so greedy decoding does not flip on
        # rounding differences between a prefill computed in one piece and one resumed from a
        # loaded prefix.
        initializer_range=0.2,
        torch_dtype="float32",
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    # Neither the EOS token nor anything else ends generation early: tests set max_tokens.
    gen = out / "generation_config.json"
    if gen.exists():
        data = json.loads(gen.read_text())
        data.pop("eos_token_id", None)
        gen.write_text(json.dumps(data))
    marker.write_text(MODEL_REVISION)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_model.py OUT_DIR")
    print(build(Path(sys.argv[1])))
