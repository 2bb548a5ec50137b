"""Tokenizer loading, chat templates (built-in Gemma-4 and shipped) and streaming."""

import json
import random

import pytest
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from tokenizers import Tokenizer as HFTokenizer

from mlx_diffgem.core.errors import CheckpointError
from mlx_diffgem.core.tiny import tiny_config_dict
from mlx_diffgem.core.tokenizer import (
    StreamingDetokenizer,
    Tokenizer,
    format_prompt,
    load_tokenizer,
)

SPECIALS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
}
# Words with the release ids of spec §1.5, so the built-in template's ids can be
# compared with the reference's exactly.
WORDS = {
    "\n": 107,
    "user": 2364,
    "model": 4368,
    "thought": 45518,
    "system": 9000,
    "Write": 6974,
    " a": 496,
    " long": 1440,
    " essay": 20494,
    " about": 1003,
    " Portugal": 23613,
    ".": 236761,
    "Be": 9001,
    " brief": 9002,
    "Hi": 9003,
    "Yo": 9004,
}
ESSAY = "Write a long essay about Portugal."
# Spec §1.5: the reference's ids for ESSAY, add_generation_prompt=True, thinking off.
ESSAY_IDS = [2, 105, 2364, 107, 6974, 496, 1440, 20494, 1003, 23613, 236761, 106, 107]
ESSAY_IDS += [105, 4368, 107, 100, 45518, 107, 101]


def gemma_like_tokenizer() -> HFTokenizer:
    """A word-level tokenizer with the release's special-token and word ids."""
    tok = HFTokenizer(models.WordLevel({**SPECIALS, **WORDS}, unk_token="<unk>"))
    split = Regex(r" ?[^\s.]+|\.|\n| ")
    tok.pre_tokenizer = pre_tokenizers.Split(split, behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return tok


@pytest.fixture
def tok_dir(tmp_path):
    gemma_like_tokenizer().save(str(tmp_path / "tokenizer.json"))
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(special))
    return tmp_path


@pytest.fixture
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def user(text):
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def test_no_tokenizer_json(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_unreadable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: cannot be read"):
        load_tokenizer(tmp_path)


def test_special_ids(tok):
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_ids) == (2, 0, [1])
    assert tok.vocab_size == 236762  # one past the largest id, gaps included
    assert tok.special_tokens["bos_token"] == "<bos>"


def test_eos_ids_merge_config(tok_dir):
    cfg = tiny_config_dict(eos_token_id=[1, 106])
    (tok_dir / "config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(tok_dir).eos_token_ids == [1, 106]
    gen = {"eos_token_id": [1, 106, 50], "pad_token_id": 0}
    (tok_dir / "generation_config.json").write_text(json.dumps(gen))
    assert load_tokenizer(tok_dir).eos_token_ids == [1, 106, 50]


def test_ids_fall_back_to_config(tok_dir):
    (tok_dir / "tokenizer_config.json").unlink()
    (tok_dir / "config.json").write_text(json.dumps(tiny_config_dict()))
    tok = load_tokenizer(tok_dir)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_ids) == (2, 0, [1])
    assert tok.special_tokens["bos_token"] == "<bos>"  # for the template


def test_encode_decode(tok):
    ids = tok.encode(ESSAY)
    assert ids == ESSAY_IDS[4:11]
    assert tok.decode([2, *ids, 1]) == ESSAY
    assert tok.decode([2, *ids], skip_special_tokens=False) == "<bos>" + ESSAY


# --------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------


def test_builtin_template_matches_reference_ids(tok):
    assert tok.chat_template is None and tok.has_chat_template
    assert tok.apply_chat_template(user(ESSAY)) == ESSAY_IDS
    text = tok.apply_chat_template(user(ESSAY), tokenize=False)
    assert text == (
        f"<bos><|turn>user\n{ESSAY}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_builtin_template_thinking(tok):
    text = tok.apply_chat_template(user(ESSAY), enable_thinking=True, tokenize=False)
    assert text == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n"
        f"<|turn>user\n{ESSAY}<turn|>\n<|turn>model\n"
    )
    ids = tok.apply_chat_template(user(ESSAY), enable_thinking=True)
    assert ids[:8] == [2, 105, 9000, 107, 98, 107, 106, 107]
    assert ids[8:] == ESSAY_IDS[1:16]  # ... up to and including `<|turn>model\n`


def test_builtin_template_system_message(tok):
    msgs = [{"role": "system", "content": " Be brief. "}, *user(ESSAY)]
    off = tok.apply_chat_template(msgs, tokenize=False)
    assert off.startswith("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n")
    assert off.endswith("<|channel>thought\n<channel|>")
    on = tok.apply_chat_template(msgs, enable_thinking=True, tokenize=False)
    # one system turn: <|think|> first, then the user's system text
    assert on.startswith("<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user")
    assert on.count("<|turn>system") == 1


def test_builtin_template_multi_turn(tok):
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Yo"},
        *user(ESSAY),
    ]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert text == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nYo<turn|>\n"
        f"<|turn>user\n{ESSAY}<turn|>\n"
    )


def test_builtin_template_bad_role(tok):
    with pytest.raises(ValueError, match="^built-in: unsupported role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="^messages: expected a list of"):
        tok.apply_chat_template("hello")


def test_shipped_template_file_wins(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "CONFIG {{ messages[0].content }}"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tok_dir)
    assert tok.apply_chat_template(user("Hi"), tokenize=False) == "CONFIG Hi"
    jinja = (
        "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content | tojson }}"
        "{% endfor %}{% if add_generation_prompt %}|{{ enable_thinking }}{% endif %}"
    )
    (tok_dir / "chat_template.jinja").write_text(jinja)
    tok = load_tokenizer(tok_dir)
    text = tok.apply_chat_template(user("café"), enable_thinking=True, tokenize=False)
    assert text == '<bos>user:"café"|True'


def test_named_templates_in_config(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT"},
    ]
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tok_dir)
    assert tok.apply_chat_template(user("Hi"), tokenize=False) == "DEFAULT"


def test_shipped_template_errors_are_one_line(tok_dir):
    bad = "{% if messages|length > 1 %}{{ raise_exception('only one\nmessage') }}"
    bad += "{% endif %}"
    (tok_dir / "chat_template.jinja").write_text(bad)
    tok = load_tokenizer(tok_dir)
    with pytest.raises(ValueError, match="chat template: only one message$"):
        tok.apply_chat_template(user("a") + user("b"))
    (tok_dir / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match="chat template: "):
        load_tokenizer(tok_dir).apply_chat_template(user("a"))


def test_sandboxed_template(tok_dir):
    (tok_dir / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="chat template"):
        load_tokenizer(tok_dir).apply_chat_template(user("a"))


def test_no_template_without_turn_tokens(tmp_path):
    plain = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template .* pass plain text$"):
        tok.apply_chat_template(user("a"))
    assert format_prompt(tok, "a") == [1]  # no bos known: nothing prepended


def test_format_prompt(tok):
    assert format_prompt(tok, ESSAY) == [2, *ESSAY_IDS[4:11]]
    assert format_prompt(tok, "<bos>" + ESSAY) == [2, *ESSAY_IDS[4:11]]  # bos once
    assert format_prompt(tok, user(ESSAY)) == ESSAY_IDS
    assert format_prompt(tok, ESSAY, chat=True) == ESSAY_IDS
    thinking = format_prompt(tok, ESSAY, chat=True, enable_thinking=True)
    assert thinking[-3:] == [105, 4368, 107]
    with pytest.raises(ValueError, match="chat=False needs a string"):
        format_prompt(tok, user(ESSAY), chat=False)


# --------------------------------------------------------------------------------------
# A user's text taken literally, and text that is not valid Unicode (issue 21)
# --------------------------------------------------------------------------------------

LITERAL = "x = '<eos>' + '<pad><bos>' # <mask><unk> and <|image|>\n"


def _literal_tokenizers(tmp_path):
    from mlx_diffgem.core.checkpoint import default_model_path
    from mlx_diffgem.core.tiny import build_char_tokenizer

    return [
        load_tokenizer(default_model_path()),
        load_tokenizer(build_char_tokenizer(tmp_path)),
    ]


def test_encode_plain_keeps_special_token_strings_as_text(tmp_path):
    for tok in _literal_tokenizers(tmp_path):
        ids = tok.encode_plain(LITERAL)
        assert not set(ids) & tok.special_token_ids, tok.name
        assert tok.decode(ids) == LITERAL  # nothing dropped as a skipped special
        # `encode` (prompts, chat templates) still reads them as special tokens,
        # before and after a plain encode (the flag lives on a copy).
        assert tok.encode("<eos>") == [tok.token_to_id("<eos>")]
        assert tok.encode("<eos>") == [1] and tok.backend.encode_special_tokens is False


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda tok: tok.encode("a\ud800b"), "text"),
        (lambda tok: tok.encode_plain("\udfff"), "text"),
        (lambda tok: format_prompt(tok, "a\ud800"), "prompt"),
        (lambda tok: format_prompt(tok, "a\ud800", chat=True), "messages"),
        (lambda tok: tok.apply_chat_template(user("\ud83d")), "messages"),
    ],
)
def test_lone_surrogates_get_a_named_error(tok, call, name):
    """Not the tokenizer library's TypeError ("TextInputSequence must be str")."""
    with pytest.raises(ValueError, match=f"^{name}: a lone surrogate .* at index"):
        call(tok)


# --------------------------------------------------------------------------------------
# Streaming detokenizer
# --------------------------------------------------------------------------------------

MULTIBYTE = "naïve café 日本語 🙂 and 語🙂é"


def byte_level_bpe() -> Tokenizer:
    """A byte-level BPE trained here; its merges split multi-byte characters."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["naïve café 日本語 🙂 " * 3 + "the naive cafe"], trainer)
    return Tokenizer(tok, bos_token_id=2)


def byte_fallback_spm() -> Tokenizer:
    """A SentencePiece-style tokenizer (Gemma's decoder chain): byte fallback, and
    the first token's leading space stripped, which only context handles."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab |= {f"<0x{b:02X}>": 4 + b for b in range(256)}
    vocab |= {c: 260 + i for i, c in enumerate("▁abcdefghijklmnopqrstuvwxyz")}
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>")
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    return Tokenizer(tok, bos_token_id=2)


def _chunks(ids, rng):
    i = 0
    while i < len(ids):
        n = rng.choice([1, 1, 2, 3, 5, 8])
        yield ids[i : i + n]
        i += n


@pytest.mark.parametrize("make", [byte_level_bpe, byte_fallback_spm])
def test_streaming_concatenates_to_decode(make):
    tok = make()
    ids = [2, *tok.encode(MULTIBYTE), 1, *tok.encode(" x 日本"), 1]
    full = tok.decode(ids)
    assert "\ufffd" not in full
    # The test is only meaningful if some prefix ends inside a character.
    assert any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(len(ids)))
    rng = random.Random(0)
    for trial in range(20):
        chunks = [ids[i : i + 1] for i in range(len(ids))] if trial == 0 else None
        det = StreamingDetokenizer(tok)
        segments = [det.add_tokens(c) for c in chunks or _chunks(ids, rng)]
        segments.append(det.finalize())
        assert all("\ufffd" not in s for s in segments)
        assert "".join(segments) == det.text == full


def test_streaming_keeps_special_tokens_when_asked():
    tok = byte_level_bpe()
    ids = [2, *tok.encode(MULTIBYTE), 1]
    det = StreamingDetokenizer(tok, skip_special_tokens=False)
    for i in ids:
        det.add_tokens([i])
    det.finalize()
    assert det.text == tok.decode(ids, skip_special_tokens=False)
    assert det.text.startswith("<bos>") and det.text.endswith("<eos>")


def test_streaming_segments_and_finalize():
    tok = byte_level_bpe()
    ids = tok.encode("café 🙂")
    det = StreamingDetokenizer(tok)
    det.add_tokens(ids[:1])
    first = det.last_segment
    assert first and det.last_segment == ""  # consumed
    det.add_tokens(ids[1:])
    assert first + det.last_segment == "café 🙂"
    # A character cut off at the end is released by finalize() only.
    k = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    det.reset()
    det.add_tokens(ids[:k])
    assert not det.text.endswith("\ufffd")
    tail = det.finalize()
    assert det.text == tok.decode(ids[:k]) and tail.endswith("\ufffd")


@pytest.mark.parametrize("make", [byte_level_bpe, byte_fallback_spm])
def test_streaming_random_ids(make):
    # Arbitrary ids: invalid UTF-8 byte runs, special tokens between bytes, ...
    tok = make()
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            det = StreamingDetokenizer(tok, skip_special_tokens=skip)
            segments = [det.add_tokens(c) for c in _chunks(ids, rng)]
            segments.append(det.finalize())
            assert "".join(segments) == tok.decode(ids, skip_special_tokens=skip)


def test_streaming_decodes_a_short_window(monkeypatch):
    tok = byte_fallback_spm()
    ids = tok.encode("the quick brown fox jumps over the lazy dog 日本 " * 20)
    decoded = []
    decode = tok.decode
    monkeypatch.setattr(
        tok, "decode", lambda i, **kw: decoded.append(len(i)) or decode(i, **kw)
    )
    det = StreamingDetokenizer(tok)
    for i in ids:
        det.add_tokens([i])
    det.finalize()
    assert det.text == decode(ids)
    assert max(decoded) < 16  # not quadratic in the length of the stream
