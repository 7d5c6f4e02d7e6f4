"""A real byte-level BPE tokenizer, trained here from a built-in corpus (no hub can be reached).

Llama-3 conventions: its pre-tokenizer split, special tokens last, BOS prepended by the
post-processor, and its chat template. `make_model` writes the result as tokenizer.json.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, END_OF_TEXT_TOKEN, "<|start_header_id|>", "<|end_header_id|>", EOT_TOKEN)
# The built-in corpus cannot support more merges than this; larger model vocabularies get padding
# rows (ids the tokenizer never produces), as published checkpoints often have.
MAX_TOKENIZER_VOCAB = 32768
MIN_VOCAB = 512

# Llama 3's pre-tokenizer split: contractions, letter runs, 1-3 digit groups, punctuation, spaces.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3's chat template, plus a role check that exercises `raise_exception`, plus tools the
# way Hermes / Qwen 2.5 templates render them: signatures in the system turn, calls as
# <tool_call>{json}</tool_call>, answers as <tool_response> (longctx reads those tags back).
CHAT_TEMPLATE = """\
{%- set preamble = namespace(text='') %}
{%- if tools %}
    {%- set preamble.text = '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
        ~ 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' %}
    {%- for tool in tools %}
        {%- set preamble.text = preamble.text ~ '\n' ~ (tool | tojson) %}
    {%- endfor %}
    {%- set preamble.text = preamble.text ~ '\n</tools>\n\nFor each function call, return a json object with '
        ~ 'function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n'
        ~ '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' %}
    {%- if messages[0]['role'] != 'system' %}
        {{- bos_token ~ '<|start_header_id|>system<|end_header_id|>\n\n' ~ preamble.text ~ '<|eot_id|>' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- set turn = namespace(body=message['content'] | trim) %}
    {%- if message['role'] == 'system' and preamble.text %}
        {%- set turn.body = turn.body ~ '\n\n' ~ preamble.text %}
    {%- endif %}
    {%- for call in message.get('tool_calls') or [] %}
        {%- set call_json = {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson %}
        {%- set turn.body = turn.body ~ '\n<tool_call>\n' ~ call_json ~ '\n</tool_call>' %}
    {%- endfor %}
    {%- set role = message['role'] %}
    {%- if role == 'tool' %}
        {%- set role = 'ipython' %}
        {%- set turn.body = '<tool_response>\n' ~ turn.body ~ '\n</tool_response>' %}
    {%- endif %}
    {%- set content = '<|start_header_id|>' ~ role ~ '<|end_header_id|>\n\n' ~ turn.body ~ '<|eot_id|>' %}
    {%- if loop.index0 == 0 and not (tools and messages[0]['role'] != 'system') %}
        {%- set content = bos_token ~ content %}
    {%- endif %}
    {{- content }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


# Real text in several scripts, so that byte-level BPE learns English and code well while rarer
# multi-byte characters (CJK, emoji) stay split over several tokens.
_CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog. A long context lets a model read a whole book, a
code base or a year of chat logs at once, and answer questions about any part of it.
Serving large language models means batching requests, caching keys and values, and streaming
tokens back to the client as soon as they are sampled. The scheduler decides which requests run
in each step; the workers compute attention over every cached block of every sequence.
It's a naïve café owner's résumé: she'd rather read Goethe's Faust über Nacht, à la française.
El niño pidió una canción; la señora respondió con cariño. Ça va très bien, merci beaucoup!
Москва — столица России. Съешь же ещё этих мягких французских булок, да выпей чаю.
Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο. Ελληνικά γράμματα: α β γ δ ε.
東京は日本の首都です。今日はいい天気ですね。私は本を読みます。
北京是中国的首都。我们今天去图书馆看书，然后一起吃饭。
서울은 한국의 수도입니다. 안녕하세요, 만나서 반갑습니다.
مرحبا بالعالم. اللغة العربية جميلة. हिन्दी भाषा भारत में बोली जाती है।
Emoji: 😀 😂 🚀 🎉 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ ✨ — math: ∑ ∫ √ ≤ ≥ ≠ ∞ π ≈ 3.14159; arrows → ← ↔.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for index, value in enumerate(values):
    print(f"{index}: {value!r}")  # comments explain why, not what

class Request:
    def __init__(self, request_id: str, prompt: list[int]) -> None:
        self.request_id = request_id
        self.prompt = prompt

{"model": "longctx", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 128}
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name ORDER BY 2 DESC;
if (x != NULL && y >= 0) { return x->next[y]; } else { exit(1); }
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 65536 1000000 3.5e-7 2026-11-23 12:34:56.
"""

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
           "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck", "x"]


def _training_corpus(bpe_vocab: int) -> Iterator[str]:
    """The real text, repeated, plus pseudo-words (enough distinct ones for large vocabularies)."""
    for _ in range(8):
        yield from _CORPUS_TEXT.splitlines(keepends=True)
    rng = random.Random(20261123)
    lexicon = [_pseudo_word(rng) for _ in range(bpe_vocab)]
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]  # Zipf, like real word counts
    for _ in range(bpe_vocab // 4):
        words = rng.choices(lexicon, weights, k=12)
        yield " ".join(words).capitalize() + rng.choice([". ", ", ", "? ", "!\n", ".\n"])


def _pseudo_word(rng: random.Random) -> str:
    syllables = rng.randint(1, 4)
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def trained_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer of at most `vocab_size` ids, special tokens last (as in Llama 3)."""
    return _train_tokenizer(min(vocab_size, MAX_TOKENIZER_VOCAB))


@functools.lru_cache(maxsize=8)
def _train_tokenizer(vocab_size: int) -> str:
    # Deterministic (fixed corpus; the trainer breaks count ties by pair) and cached in this process
    # so that tests making many model folders train once per vocabulary size.
    bpe_vocab = vocab_size - len(SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_training_corpus(bpe_vocab), trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
        ),
    ])  # fmt: skip
    return tokenizer.to_str()
