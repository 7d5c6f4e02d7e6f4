"""DeepSeek's chat format, for V3.2 / V4 folders that ship no Jinja chat template.

Those folders render chats with a Python module beside the weights (`encoding/encoding_dsv32.py`,
and its V4 counterpart) instead of a `chat_template`. Its non-thinking ("chat") mode, the one an
OpenAI chat request without reasoning asks for, renders

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{reply}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜></think>

(the empty think block closes reasoning before the reply). A folder is taken for such a one when
it has no template and its vocabulary holds the role tokens. Thinking mode, tools and the DSML
tool-call format are not rendered here: a folder's own template, when present, always wins.
"""

from __future__ import annotations

from collections.abc import Callable

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
END_OF_SENTENCE = "<｜end▁of▁sentence｜>"
END_OF_THINKING = "</think>"

DEEPSEEK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + END_OF_THINKING
    + "{{ message['content'] }}" + END_OF_SENTENCE +
    "{% else %}{{ raise_exception('DeepSeek chats take system, user and assistant messages, not ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + END_OF_THINKING + "{% endif %}"
)


def deepseek_chat_template(token_to_id: Callable[[str], int | None]) -> str | None:
    """The template for a folder without one whose vocabulary holds DeepSeek's role tokens."""
    if token_to_id(USER) is None or token_to_id(ASSISTANT) is None:
        return None
    return DEEPSEEK_CHAT_TEMPLATE
