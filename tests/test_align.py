"""Exact token bytes and chunk alignment, on real pretrained tokenizers and trained ones."""

import functools

import numpy as np
import pytest
import tokenizer_assets as assets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tide_ds.align import Placement, TokenBytes, align_chunks, align_spans, place_tokens, token_byte_table


def reference_chunks(a: list[bytes], b: list[bytes]) -> list[tuple[int, int, int, int]]:
    """The textbook two-pointer walk over non-empty tokens: advance the side that is behind; close a
    chunk whenever both prefixes end at one byte offset, keep it if its bytes agree."""
    chunks, i, j, i0, j0, pa, pb = [], 0, 0, 0, 0, 0, 0
    while i < len(a) or j < len(b):
        if j == len(b) or (i < len(a) and pa <= pb):
            pa, i = pa + len(a[i]), i + 1
        else:
            pb, j = pb + len(b[j]), j + 1
        if pa == pb:
            if b"".join(a[i0:i]) == b"".join(b[j0:j]):
                chunks.append((i0, i, j0, j))
            i0, j0 = i, j
    return chunks


# ---------------------------------------------------------------------------------------------
# Text strategies: the kinds of text the issue names

unicode_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=120)
code_text = st.lists(
    st.sampled_from(
        [
            "def",
            " f",
            "(x",
            "):",
            "\n",
            "\t",
            "\t\t",
            "    ",
            "  ",
            " ",
            "return",
            "#",
            "x_1",
            "=",
            "==",
            "'s'",
            "\r\n",
            "{",
            "}",
            "0x1F",
            "  # note",
        ]
    ),
    min_size=1,
    max_size=40,
).map("".join)
cjk_text = st.text(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF) | st.sampled_from(" ，。\n"), min_size=1, max_size=60
)
emoji_text = st.text(
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF) | st.sampled_from(" ab\u200d\ufe0f"),
    min_size=1,
    max_size=40,
)
accented_text = st.lists(
    st.sampled_from(list("aeiouAEIOU éèêëçñøåßÉÀ") + ["e\u0301", "a\u0308", "\u00c5"]), min_size=1, max_size=80
).map("".join)  # precomposed and combining accents
any_text = st.one_of(
    unicode_text,
    code_text,
    cjk_text,
    emoji_text,
    accented_text,
    st.lists(st.one_of(code_text, cjk_text, emoji_text, accented_text), min_size=2, max_size=4).map(" ".join),
)
PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def lossless_tokenizers():
    """name -> (encode(text) -> ids, TokenBytes), for tokenizers that can spell any text."""

    def hf(path):
        tok = assets.load(path)
        return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), cached_token_bytes(path)

    llama3, qwen_tt, sp = assets.llama3(), assets.qwen_tiktoken(), assets.sentencepiece_processor()
    return {
        "qwen": hf(assets.qwen_dir()),
        "mistral": hf(assets.mistral_dir()),
        "trained_bpe": hf(assets.trained_dirs()[0]),
        "trained_sp": hf(assets.trained_dirs()[1]),
        "llama3_tiktoken": (llama3.encode, TokenBytes(llama3)),
        "qwen_tiktoken": (qwen_tt.encode_ordinary, TokenBytes(qwen_tt)),
        "mistral_sentencepiece": (sp.encode, TokenBytes(sp)),
    }


@pytest.fixture(scope="module")
def lossless():
    return lossless_tokenizers()


@functools.cache
def cached_token_bytes(path: str) -> TokenBytes:
    return TokenBytes(assets.load(path))


def token_bytes(entry, text):
    encode, tb = entry
    return tb.token_bytes(text, encode(text))


# ---------------------------------------------------------------------------------------------
# Byte tables


def test_qwen_table_matches_tiktoken_for_every_id():
    hf = token_byte_table(assets.load(assets.qwen_dir()))
    reference = assets.qwen_tiktoken()
    assert len(hf) == reference.n_vocab
    assert hf == [reference.decode_single_token_bytes(i) for i in range(reference.n_vocab)]


def test_sentencepiece_tables_agree_between_transformers_and_sentencepiece():
    hf = token_byte_table(assets.load(assets.mistral_dir()))
    sp = token_byte_table(assets.sentencepiece_processor())
    special = {0, 1, 2}  # <unk> <s> </s>: text in HF, control pieces in sentencepiece
    assert len(hf) == len(sp) == 32000
    assert [b for i, b in enumerate(hf) if i not in special] == [b for i, b in enumerate(sp) if i not in special]
    assert hf[1] == b"<s>" and hf[2] == b"</s>"
    tok = assets.load(assets.mistral_dir())
    assert hf[tok.convert_tokens_to_ids("<0x0A>")] == b"\n"  # byte fallback
    assert hf[tok.convert_tokens_to_ids("\u2581the")] == b" the"  # the space marker


def test_wordpiece_table_drops_the_continuation_marker():
    tok = assets.load(assets.bert_dir())
    table = token_byte_table(tok)
    assert table[tok.convert_tokens_to_ids("##ing")] == b"ing"
    assert table[tok.convert_tokens_to_ids("running")] == b"running"
    assert table[tok.cls_token_id] == b"[CLS]"


def test_special_tokens_are_spelled_as_their_text():
    tok = assets.load(assets.qwen_dir())
    tb = cached_token_bytes(assets.qwen_dir())
    text = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert b"".join(tb.token_bytes(text, ids)) == text.encode()
    assert tb.place(text, ids).exact.all()


def test_unknown_tokenizer_type_is_refused():
    with pytest.raises(TypeError, match="cannot read token bytes"):
        token_byte_table(object())


# ---------------------------------------------------------------------------------------------
# Placement


def test_sentencepiece_dummy_prefix_is_not_part_of_the_text(lossless):
    text = "Hello world"
    for name in ("mistral", "mistral_sentencepiece"):
        pieces = lossless[name][1].pieces(lossless[name][0](text))
        assert pieces[0] == b" Hello"  # the tokenizer added a space
        assert b"".join(token_bytes(lossless[name], text)) == b"Hello world"


def test_wordpiece_placement_uses_offsets_and_marks_lossy_tokens():
    tok = assets.load(assets.bert_dir())
    tb = TokenBytes(tok)
    text = "Hello,  wörld 你 unbelievably x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    place = tb.place(text, ids)  # no offsets given: it asks the tokenizer for them
    got = dict(
        zip(tok.convert_ids_to_tokens(ids), zip(place.token_bytes(text.encode(), tb.pieces(ids)), place.exact.tolist()))
    )
    assert got["hello"] == (b"hello", False)  # lowercased: not the text
    assert got["world"][1] is False  # accent stripped
    assert got[","] == (b",", True)
    assert got["un"] == (b" un", True)  # the dropped space belongs to the word after it
    assert got["##bel"] == (b"bel", True)
    assert got["x"] == (b" x", True)  # placed correctly after the lossy tokens


def test_placement_without_offsets_marks_the_rest_inexact():
    place = place_tokens("abc", [b"a", b"X", b"c"])
    assert place.exact.tolist() == [True, False, False]
    assert place.start.tolist() == [0, 1, 1] and place.end.tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# align_chunks


def test_align_chunks_small_cases():
    assert align_chunks([b"ab", b"c"], [b"a", b"bc"]) == [(0, 2, 0, 2)]
    assert align_chunks([b"a", b"b"], [b"a", b"b"]) == [(0, 1, 0, 1), (1, 2, 1, 2)]
    # a differing token is dropped, the chunks after it stay
    assert align_chunks([b"a", b"X", b"c"], [b"a", b"Y", b"c"]) == [(0, 1, 0, 1), (2, 3, 2, 3)]
    # different lengths: no boundary matches after the difference, nothing is mis-paired
    assert align_chunks([b"a", b"XX", b"c"], [b"a", b"Y", b"c"]) == [(0, 1, 0, 1)]
    assert align_chunks([], [b"a"]) == []
    assert align_chunks([b"\xe4\xbd", b"\xa0"], [b"\xe4", b"\xbd\xa0"]) == [(0, 2, 0, 2)]  # inside a character


@given(st.lists(st.binary(min_size=0, max_size=4), max_size=30), st.data())
@settings(max_examples=300, deadline=None)
def test_align_chunks_matches_the_reference_walk(pieces, data):
    """Two random splittings of one byte string (plus random corruption) against the textbook walk."""
    whole = b"".join(pieces)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(whole)), max_size=12)))
    other = [whole[a:b] for a, b in zip([0] + cuts, cuts + [len(whole)])]
    if other and data.draw(st.booleans()):
        k = data.draw(st.integers(0, len(other) - 1))
        other[k] = data.draw(st.binary(max_size=4))
    pieces = [p for p in pieces if p]  # the reference walk is defined for non-empty tokens
    other = [p for p in other if p]
    assert align_chunks(pieces, other) == reference_chunks(pieces, other)


# ---------------------------------------------------------------------------------------------
# Properties over real tokenizers


PAIRS = [
    ("qwen", "mistral"),
    ("llama3_tiktoken", "mistral_sentencepiece"),
    ("trained_bpe", "trained_sp"),
    ("qwen_tiktoken", "llama3_tiktoken"),
]


@pytest.mark.parametrize("teacher,student", PAIRS)
@given(text=any_text)
@PROPERTY
def test_lossless_pairs_cover_every_byte_with_equal_chunks(lossless, teacher, student, text):
    t_bytes, s_bytes = token_bytes(lossless[teacher], text), token_bytes(lossless[student], text)
    assert b"".join(t_bytes) == text.encode() == b"".join(s_bytes)  # both spell the text exactly
    chunks = align_chunks(t_bytes, s_bytes)
    for t0, t1, s0, s1 in chunks:
        assert b"".join(t_bytes[t0:t1]) == b"".join(s_bytes[s0:s1])
    starts = [c[0] for c in chunks]
    assert starts == sorted(starts) and all(a[1] <= b[0] and a[3] <= b[2] for a, b in zip(chunks, chunks[1:]))
    covered = sum(len(b"".join(t_bytes[t0:t1])) for t0, t1, _, _ in chunks)
    assert covered == len(text.encode())


@pytest.mark.parametrize("name", ["qwen", "mistral", "llama3_tiktoken", "trained_sp"])
@given(text=any_text)
@PROPERTY
def test_a_tokenizer_aligned_with_itself_gives_one_chunk_per_token(lossless, name, text):
    pieces = token_bytes(lossless[name], text)
    chunks = align_chunks(pieces, pieces)
    # a zero-length token (a lone dummy-prefix space) joins the chunk of the token after it
    assert len(chunks) == sum(1 for p in pieces if p)
    assert all((t0, t1) == (s0, s1) for t0, t1, s0, s1 in chunks)


@given(text=st.one_of(accented_text, code_text, cjk_text, emoji_text, unicode_text))
@PROPERTY
def test_lossy_wordpiece_chunks_still_spell_equal_bytes(text):
    """BERT lowercases, strips accents and has [UNK]: fewer chunks, but never a mis-paired one."""
    bert, qwen = assets.load(assets.bert_dir()), assets.load(assets.qwen_dir())
    b_tb, q_tb = cached_token_bytes(assets.bert_dir()), cached_token_bytes(assets.qwen_dir())
    b_ids = bert(text, add_special_tokens=False)["input_ids"]
    q_ids = qwen(text, add_special_tokens=False)["input_ids"]
    b_place, q_place = b_tb.place(text, b_ids), q_tb.place(text, q_ids)
    b_chunk, q_chunk, n = align_spans(b_place, q_place)
    b_bytes = b_place.token_bytes(text.encode(), b_tb.pieces(b_ids))
    q_bytes = q_place.token_bytes(text.encode(), q_tb.pieces(q_ids))
    b_pieces = b_tb.pieces(b_ids)
    for c in range(n):
        b_side = b"".join(p for p, k in zip(b_bytes, b_chunk) if k == c)
        q_side = b"".join(p for p, k in zip(q_bytes, q_chunk) if k == c)
        assert b_side == q_side and b_side
        # BERT's own pieces spell the chunk, less the whitespace its pre-tokenizer dropped
        assert b"".join(b_side.split()) == b"".join(p for p, k in zip(b_pieces, b_chunk) if k == c)
    assert list(np.unique(b_chunk[b_chunk >= 0])) == list(range(n)) == list(np.unique(q_chunk[q_chunk >= 0]))


def test_lowercase_ascii_aligns_fully_with_wordpiece():
    bert, qwen = assets.load(assets.bert_dir()), assets.load(assets.qwen_dir())
    text = "the quick brown fox jumps over the lazy dog, again and again."
    b_place = cached_token_bytes(assets.bert_dir()).place(text, bert(text, add_special_tokens=False)["input_ids"])
    q_place = cached_token_bytes(assets.qwen_dir()).place(text, qwen(text, add_special_tokens=False)["input_ids"])
    b_chunk, q_chunk, n = align_spans(b_place, q_place)
    assert n > 10 and (b_chunk >= 0).all() and (q_chunk >= 0).all()


def test_align_spans_keeps_separate_spans_apart():
    # two one-token spans laid one byte apart: two chunks, none across the gap
    teacher = Placement(np.array([0, 4]), np.array([3, 6]), np.array([True, True]))
    student = Placement(np.array([0, 1, 4]), np.array([1, 3, 6]), np.array([True, True, True]))
    t_chunk, s_chunk, n = align_spans(teacher, student)
    assert n == 2 and t_chunk.tolist() == [0, 1] and s_chunk.tolist() == [0, 0, 1]
    # an inexact token spoils its chunk only
    student.exact[2] = False
    t_chunk, s_chunk, n = align_spans(teacher, student)
    assert n == 1 and t_chunk.tolist() == [0, -1] and s_chunk.tolist() == [0, 0, -1]
