"""Reading one data row and rendering it with a tokenizer's chat template.

A row holds either a conversation (`messages`: a list of {"role", "content"}) or plain `text`.
Each side renders the conversation with its own template; every message's content is then found
in the rendered text, so that alignment can stay inside text known to be the same on both sides.
Rows that cannot be used raise `SkipRow` with a short reason that the report counts.
"""

from __future__ import annotations

from dataclasses import dataclass

# For tokenizers without a chat template. The end-of-sequence token closes each assistant turn so
# that the student learns to stop.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
RESPONSE_ROLE = "assistant"
AUTO_COLUMNS = ("messages", "text")  # what column "auto" reads


class SkipRow(Exception):
    """This row is left out; `reason` is counted in the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def conversation_of(row: dict, column: str = "auto") -> list[dict[str, str]] | str:
    """The row's messages (validated) or its text; raises SkipRow for unusable rows.

    `column` "auto" reads `messages` (a conversation), or `text` (a string) where a row has no
    messages. A named column holds either: a list is a conversation, a string a text.
    """
    if column == "auto":
        if row.get("messages") is not None:
            return _messages(row["messages"])
        if row.get("text") is not None:
            return _text(row["text"])
        raise SkipRow("missing_column")
    value = row.get(column)
    if value is None:
        raise SkipRow("missing_column")
    return _messages(value) if isinstance(value, list) else _text(value)


def _text(value) -> str:
    if isinstance(value, bytes):  # a binary column
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SkipRow("invalid_utf8") from None
    if not isinstance(value, str):
        raise SkipRow("bad_text")
    _check_text(value)
    return value


def _messages(value) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise SkipRow("bad_messages")
    messages = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SkipRow("bad_messages")
        _check_text(m["content"])
        _check_utf8(m["role"])
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == RESPONSE_ROLE for m in messages):
        raise SkipRow("no_response")
    return messages


def _check_text(text: str) -> None:
    _check_utf8(text)
    if not text.strip():
        raise SkipRow("empty_content")


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a "\ud800" escape in JSON
        raise SkipRow("invalid_utf8") from None


@dataclass
class Rendered:
    """One side's rendering of a row. Spans are byte offsets into `text` encoded as UTF-8."""

    text: str
    contents: list[tuple[int, int]]  # byte span of each response message's content
    responses: list[tuple[int, int]]  # byte span of each response turn: content start .. end of turn
    append_eos: bool = False  # plain text rows: the student ends with its EOS token


def render_text(text: str) -> Rendered:
    n = len(text.encode("utf-8"))
    return Rendered(text, [(0, n)], [(0, n)], append_eos=True)


def render_pair(
    messages: list[dict[str, str]], student: tuple, teacher: tuple, supervise: str = "all_turns"
) -> tuple[Rendered, Rendered]:
    """Renders `messages` for both sides; `student` and `teacher` are (tokenizer, template) pairs.
    `supervise`: "all_turns" (every response turn is trained on) or "last_turn" (only the last; the
    earlier messages are all prompt, as in the paper's runs).

    Each message's content is searched in both renderings after the text the earlier messages
    render to (as is, else stripped, as templates often strip it); the same form is used on both
    sides, so the spans hold equal text.
    """
    s_text, s_starts = _render_turns(*student, messages)
    t_text, t_starts = _render_turns(*teacher, messages)
    s_spans, t_spans = [], []
    s_cursor = t_cursor = 0
    for k, m in enumerate(messages):
        s_from, t_from = max(s_cursor, s_starts[k]), max(t_cursor, t_starts[k])
        for form in dict.fromkeys((m["content"], m["content"].strip())):
            s_at, t_at = s_text.find(form, s_from), t_text.find(form, t_from)
            if s_at >= 0 and t_at >= 0:
                break
        else:
            raise SkipRow("content_not_found")
        s_cursor, t_cursor = s_at + len(form), t_at + len(form)
        s_spans.append((s_at, s_cursor))
        t_spans.append((t_at, t_cursor))

    responses = [k for k, m in enumerate(messages) if m["role"] == RESPONSE_ROLE]
    if supervise == "last_turn":
        responses = responses[-1:]
    # A response turn runs from its content to where the next message's text starts, so that the
    # end-of-turn marker (e.g. "<|im_end|>") is learned; the content end if that is unknown.
    turns = [(s_spans[k][0], max(s_spans[k][1], s_starts[k + 1])) for k in responses]
    student_side = Rendered(s_text, _to_bytes(s_text, [s_spans[k] for k in responses]), _to_bytes(s_text, turns))
    t_contents = _to_bytes(t_text, [t_spans[k] for k in responses])
    return student_side, Rendered(t_text, t_contents, t_contents)


def _render(tokenizer, template: str, messages) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # templates raise on conversations they do not accept (e.g. roles that do not alternate)
        raise SkipRow("template_error") from None


def _render_turns(tokenizer, template: str, messages) -> tuple[str, list[int]]:
    """The rendered conversation, and where each message's text starts in it (the length of the
    rendering of the messages before it; 0 where that is not a prefix), plus the text's end."""
    text = _render(tokenizer, template, messages)
    starts = [0]
    for k in range(1, len(messages)):
        try:
            prefix = _render(tokenizer, template, messages[:k])
        except SkipRow:
            prefix = None
        starts.append(len(prefix) if prefix is not None and text.startswith(prefix) else 0)
    return text, starts + [len(text)]


def _to_bytes(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    if len(text) == len(text.encode("utf-8")):  # ASCII: character and byte offsets agree
        return list(spans)
    return [(len(text[:s].encode("utf-8")), len(text[:e].encode("utf-8"))) for s, e in spans]
