"""Chat formats written by hand must give the token ids of transformers' apply_chat_template."""

import pytest
from conftest import make_tokenizer, CHATML
import model
from swatkit import tokenizer
import train

QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% "
    "endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2.5's shape: a tools branch first, whose system turn is built piecewise, then the default
# system prompt
QWEN25 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are "
    "a helpful assistant.' }}"
    "{%- endif %}{{- \"<|im_end|>\\n\" }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    '{%- endif %}{%- endif %}{%- for message in messages %}{%- if (message.role == "user") or '
    "(message.role == "
    '"system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- "
    "endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA31 = (
    '{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- '
    "endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim "
    "%}"
    '{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}{{- "Today Date: " + date_string + "\\n\\n" '
    "}}"
    '{{- system_message }}{{- "<|eot_id|>" }}{%- for message in messages %}'
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% "
    "endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% "
    "endif %}{% endfor %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)

# later Mistral versions, written here in the same form as the published ones: where the system
# prompt goes, spaces around [INST], a leading space and trimming of the reply
_MSYS = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- "
    "endif %}"
)
MISTRAL2 = (
    _MSYS + "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif "
    "%}{%- endfor %}"
)
MISTRAL3 = (
    _MSYS + '{{- bos_token }}{%- for message in loop_messages %}{%- if message["role"] == "user" %}'
    "{%- if loop.last and system_message is defined %}"
    '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}'
    '{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}'
    '{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token}}{%- '
    "endif %}{%- endfor %}"
)
TEKKEN = MISTRAL3.replace('"[INST] "', '"[INST]"').replace(
    '" " + message["content"]|trim', 'message["content"]'
)
LLAMA32 = LLAMA31.replace(
    '{%- set date_string = "26 Jul 2024" %}',
    "{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}'
    '{%- set date_string = "26 Jul 2024" %}{%- endif %}',
)

CASES = {  # name: template, bos, eos, expected family, whether a system turn is allowed
    "smollm2": (CHATML, "<|im_start|>", "<|im_end|>", "chatml", True),
    "qwen2": (QWEN2, "<|endoftext|>", "<|im_end|>", "chatml", True),
    "qwen2.5": (QWEN25, "<|endoftext|>", "<|im_end|>", "chatml", True),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "llama3", True),
    "llama3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>", "llama3", True),
    "llama2": (LLAMA2, "<s>", "</s>", "llama2", True),
    "mistral": (MISTRAL, "<s>", "</s>", "mistral", False),
    "mistral-v0.2": (MISTRAL2, "<s>", "</s>", "mistral", True),
    "mistral-v0.3": (MISTRAL3, "<s>", "</s>", "mistral", True),
    "mistral-tekken": (TEKKEN, "<s>", "</s>", "mistral", True),
    "llama3.2": (LLAMA32, "<|begin_of_text|>", "<|eot_id|>", "llama3", True),
}
CHATS = [
    [{"role": "user", "content": "How do I bake bread at home?"}],
    [{"role": "user", "content": "  Write a poem about the sea.  "}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain photosynthesis."},
    ],
    [
        {"role": "user", "content": "1 + 2 = ?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "and 4 + 5?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": " Blue. "},
    ],
]


@pytest.mark.parametrize("name", CASES)
def test_chat_ids_match_transformers(tmp_path, name):
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, family, system_ok = CASES[name]
    make_tokenizer(str(tmp_path), template, bos=bos, eos=eos)
    tok = tokenizer.Tok(str(tmp_path))
    assert tok.format == family
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token=bos, eos_token=eos
    )
    hf.chat_template = template
    assert LLAMA32 != LLAMA31 and "strftime_now" in LLAMA32 and TEKKEN != MISTRAL3
    for chat in CHATS:
        if chat[0]["role"] == "system" and not system_ok:
            continue
        for gen in (True, False):
            want = hf.apply_chat_template(
                chat, add_generation_prompt=gen, tokenize=True, return_dict=True
            )["input_ids"]
            assert tok.encode_chat(chat, add_generation_prompt=gen) == list(want), (chat, gen)


def test_format_override_and_unknown(tmp_path):
    make_tokenizer(str(tmp_path), CHATML)
    assert tokenizer.Tok(str(tmp_path), chat_format="llama2").format == "llama2"
    with pytest.raises(model.SwatError, match="unknown chat format 'vicuna'"):
        tokenizer.Tok(str(tmp_path), chat_format="vicuna")
    zephyr = (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
        "eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    # its own system turn
    v7 = "{{- bos_token }}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}" + MISTRAL3
    for template in (zephyr, v7):  # families swat-min does not write: said, not guessed
        make_tokenizer(str(tmp_path), template, bos="<s>", eos="</s>")
        with pytest.raises(model.SwatError, match="none of the families"):
            tokenizer.Tok(str(tmp_path)).encode_chat([{"role": "user", "content": "Hi"}])
    assert tokenizer.Tok(str(tmp_path), chat_format="chatml").encode_chat(
        [{"role": "user", "content": "Hi"}]
    )


@pytest.mark.parametrize("name", CASES)
def test_training_labels_cover_only_the_reply(tmp_path, name):
    """train.encode's ids are transformers' for the whole chat, and its loss counts the reply alone,
    even
    where the template rearranges a chat that ends with a reply (Mistral v0.3 then drops the system
    prompt)."""
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, _, system_ok = CASES[name]
    make_tokenizer(str(tmp_path), template, bos=bos, eos=eos)
    tok = tokenizer.Tok(str(tmp_path))
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token=bos, eos_token=eos
    )
    hf.chat_template = template
    reply = {"role": "assistant", "content": "Blue is the colour of the sea."}
    for chat in CHATS:
        if chat[0]["role"] == "system" and not system_ok:
            continue
        chat = (chat[:-1] if chat[-1]["role"] == "assistant" else chat) + [reply]
        ids, labels = train.encode(tok, chat, 512)
        assert ids == list(
            hf.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        )
        n = labels.count(-100)
        assert labels == [-100] * n + ids[n:]
        assert tok.decode(ids[n:]).strip() == reply["content"], (name, chat, tok.decode(ids[n:]))


def test_no_template_is_said(tmp_path, capsys):
    make_tokenizer(str(tmp_path))  # a base model's tokenizer: no chat template
    assert (
        tokenizer.Tok(str(tmp_path)).format == "chatml"
        and "no chat template" in capsys.readouterr().err
    )
    assert (
        tokenizer.Tok(str(tmp_path), chat_format="llama3").format == "llama3"
        and not capsys.readouterr().err
    )


def test_misused_api_is_said(tmp_path):
    """A chat that is not a list of role/content dicts, and ids that are not one list of ids, are
    one line."""
    make_tokenizer(str(tmp_path), CHATML)
    tok = tokenizer.Tok(str(tmp_path))
    for chat in (
        "Hi",
        {"role": "user", "content": "Hi"},
        ["Hi"],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
    ):
        with pytest.raises(model.SwatError, match="messages must be a list of"):
            tok.encode_chat(chat)
    for ids in (None, "abc", [[1, 2]], [-1]):
        with pytest.raises(model.SwatError, match="decode: ids must be one list"):
            tok.decode(ids)
    assert tok.decode(tok.encode("Hi there")) == "Hi there"
