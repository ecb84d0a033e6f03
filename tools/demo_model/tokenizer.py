"""Byte-level BPE tokenizer for the demo model, trained on the corpus's train split.

Two pre-tokenizer rules make the small tasks learnable by a tiny model: digits are always single
tokens (so sums and unit conversions work digit by digit), and the letters of a quoted word or of a
spelled word ("c-a-t") are single tokens (so spelling, reversing and counting only need copying).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from tools.demo_model.corpus import training_texts

VOCAB_SIZE = 768
SPECIAL_TOKENS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# A letter inside a quoted word, or a letter next to a hyphen between letters.
LETTER_RULE = r'[A-Za-z](?=[A-Za-z]*")|[A-Za-z](?=-[A-Za-z])|(?<=[A-Za-z]-)[A-Za-z]'


def build_tokenizer(out_dir: Path | None = None):
    """Train the tokenizer and wrap it for transformers; save it (with its chat template) when out_dir is given."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LETTER_RULE), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast
