"""The tokenizer (tokenizer.json) and the chat format, written by hand for four families, so that a
chat becomes exactly the token ids transformers' apply_chat_template gives: chatml (SmolLM2, Qwen2),
llama3, llama2 and mistral ([INST]). Each family has quirks (a default system prompt, Llama 3.1's
dated system turn, Mistral's versions); they are read off the checkpoint's own chat_template
string."""

import os
import re
import sys
import time
from dataclasses import dataclass

from tokenizers import Tokenizer
from .files import SwatError, read_json


def detect_format(template):
    """The chat family a template string writes (None: one swat-min does not write)."""
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<<SYS>>" in template:
        return "llama2"
    if "[INST]" in template and "[SYSTEM_PROMPT]" not in template:
        return "mistral"
    if "<|im_start|>" in template or not template:
        return "chatml"
    return None


@dataclass
class MistralStyle:
    """How a Mistral template writes a chat: its versions differ in the spaces around [INST] and
    before the reply, in trimming the reply, and in which user turn carries the system prompt."""

    inst_open: str = "[INST] "
    inst_close: str = " [/INST]"
    space_before_reply: bool = False
    trim_reply: bool = False
    system_in_last_turn: bool = False

    @classmethod
    def read(cls, template):
        """The style, read off the template's own string literals."""

        def literal(pattern, default):
            found = re.findall(r"['\"](%s)['\"]" % pattern, template)
            return found[0] if found else default

        return cls(
            inst_open=literal(r" ?\[INST\] ?", "[INST] "),
            inst_close=literal(r" ?\[/INST\]", " [/INST]"),
            space_before_reply=bool(re.search(r"['\"] ['\"] *\+ *message\[['\"]content", template)),
            trim_reply=bool(re.search(r"content['\"]\] *\| *trim *\+ *eos_token", template)),
            system_in_last_turn="loop.last and system_message" in template,
        )


class Tok:
    """tokenizer.json plus the chat format of the checkpoint in `path`: the family is read off its
    chat_template string (tokenizer_config.json or chat_template.jinja), or forced with
    chat_format=."""

    FORMATS = ("chatml", "llama3", "llama2", "mistral")

    def __init__(self, path, chat_format=None):
        self.path = path
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise SwatError(f"{tj}: not found (swat-min needs the fast-tokenizer file)")
        try:
            self.tk = Tokenizer.from_file(tj)
        except Exception as e:
            raise SwatError(f"{tj}: unreadable ({str(e).splitlines()[0]})") from None
        tcp = os.path.join(path, "tokenizer_config.json")
        tc = read_json(tcp) if os.path.exists(tcp) else {}
        special = lambda v: v.get("content") if isinstance(v, dict) else v
        self.bos = special(tc.get("bos_token")) or ""
        self.eos = special(tc.get("eos_token")) or ""
        if not isinstance(self.bos, str) or not isinstance(self.eos, str):
            raise SwatError(f"{tcp}: bos_token and eos_token must be token strings")
        t = tc.get("chat_template") or ""
        if isinstance(t, list):  # named templates: take the default one
            t = next(
                (
                    x.get("template")
                    for x in t
                    if isinstance(x, dict) and x.get("name") == "default"
                ),
                "",
            )
        if not isinstance(t, str):
            raise SwatError(
                f"{tcp}: chat_template must be a template string or a list of named ones"
            )
        jinja = os.path.join(path, "chat_template.jinja")
        if not t and os.path.exists(jinja):
            try:
                with open(jinja, encoding="utf-8") as f:
                    t = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise SwatError(f"{jinja}: unreadable ({e})") from None
        if not t and not chat_format:  # a base model: no template to read the format off
            print(
                f"{path}: no chat template; formatting chats as ChatML (choose with chat_format=)",
                file=sys.stderr,
            )
        if chat_format and chat_format not in self.FORMATS:
            raise SwatError(
                f"unknown chat format {chat_format!r}; choose one of {', '.join(self.FORMATS)}"
            )
        # another family's template (Zephyr's, Mistral v7's) gives None: render() refuses it
        self.format = chat_format or detect_format(t)
        # the family's default system prompt, as the template writes it when the user gives none
        # (the text may not hold "<|im_": so each match attempt stops at the next tag, and a long
        # template is read in linear time, not quadratic)
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)((?:[^'\"{}<]|<(?!\|im_))*)<\|im_end\|>", t)
        self.system = m.group(1).replace("\\n", "\n") if m else None
        # Llama 3.1+ always opens with a dated system turn; 3.1 fixes its date, 3.2 takes today's
        self.dated = "Cutting Knowledge Date" in t
        m = re.search(r'date_string = "([^"]+)"', t)
        self.date = m.group(1) if m and "strftime_now" not in t else None
        self.mistral = MistralStyle.read(t)
        ids = [
            self.tk.token_to_id(s)
            for s in (self.eos, "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
        ]
        self.stop_ids = {i for i in ids if i is not None}

    def encode(self, text, special=True):
        return self.tk.encode(text, add_special_tokens=special).ids

    def decode(self, ids):
        try:
            return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)
        except (TypeError, ValueError, OverflowError):
            raise SwatError("decode: ids must be one list (or 1-D tensor) of token ids") from None

    def render(self, messages, add_generation_prompt=True):
        """The chat as text, exactly as the family's template renders it."""
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise SwatError("chat: messages must be a list of {'role': ..., 'content': text} dicts")
        msgs = list(messages)
        f = self.format
        if f is None:
            raise SwatError(
                f"{self.path}: its chat template is of none of the families swat-min writes "
                f"({', '.join(self.FORMATS)}); choose one with chat_format= (--chat-format)"
            )
        sys = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
        if f == "chatml":
            sys = sys if sys is not None else self.system
            head = [{"role": "system", "content": sys}] if sys is not None else []
            s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in head + msgs)
            return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if f == "llama3":
            turn = lambda role, c: f"<|start_header_id|>{role}<|end_header_id|>\n\n{c}<|eot_id|>"
            s = self.bos
            if self.dated:
                date = self.date or time.strftime("%d %b %Y")
                s += turn(
                    "system",
                    f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
                    + (sys or "").strip(),
                )
            elif sys is not None:
                s += turn("system", sys.strip())
            s += "".join(turn(m["role"], m["content"].strip()) for m in msgs)
            return s + (
                "<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else ""
            )
        if (
            f == "llama2"
        ):  # the system prompt goes into the first user turn; each user turn opens with bos
            if sys is not None and msgs:
                msgs[0] = dict(
                    msgs[0], content=f"<<SYS>>\n{sys}\n<</SYS>>\n\n" + msgs[0]["content"]
                )
            return "".join(
                f"{self.bos}[INST] {m['content'].strip()} [/INST]"
                if m["role"] == "user"
                else f" {m['content'].strip()} {self.eos}"
                for m in msgs
            )
        style = self.mistral
        # the system prompt joins the first (or, in some versions, the last) turn if it is the
        # user's; else it is dropped, as the template does
        i = -1 if style.system_in_last_turn else 0
        if sys is not None and msgs and msgs[i]["role"] == "user":
            msgs[i] = dict(msgs[i], content=f"{sys}\n\n" + msgs[i]["content"])
        turns = []
        for m in msgs:
            if m["role"] == "user":
                turns.append(f"{style.inst_open}{m['content']}{style.inst_close}")
            else:
                reply = m["content"].strip() if style.trim_reply else m["content"]
                space = " " if style.space_before_reply else ""
                turns.append(space + reply + self.eos)
        return self.bos + "".join(turns)

    def encode_chat(self, messages, add_generation_prompt=True):
        return self.encode(self.render(messages, add_generation_prompt), special=False)
