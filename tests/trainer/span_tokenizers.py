"""Small real BPE tokenizers for span tests: agent tags as single tokens, or split into several."""

from __future__ import annotations

from tepo_ray.agent import SPECIAL_TOKENS

TEXTS = [
    "<think>about 1.2e5, too hard to do exactly</think><python>print(123*456)</python>",
    "<think>the tool says 56088 é→ ok</think><answer>56088</answer>",
    "Question: What is 123 * 456?\n<result>56088\n</result>",
    "<think>look it up</think><search>capital of france</search><think>found it</think><answer>Paris</answer>",
] * 20


def bpe_tokenizer(*, tags_as_tokens: bool, vocab_size: int = 300):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    if tags_as_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=False)
