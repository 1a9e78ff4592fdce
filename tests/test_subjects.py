"""Subject words and indices resolve to the token positions the encoder sees (real shipped tokenizers)."""
import pytest
from harness import pack_module

subjects_mod = pack_module("subjects")
resolve = subjects_mod.resolve_subjects
SubjectError = subjects_mod.SubjectError


@pytest.fixture(scope="module")
def tokenizers(tiny):
    return {family: tiny.make_clip(family).tokenizer for family in ("sd15", "sd2", "sdxl")}


def test_words_and_indices_agree(tokenizers):
    tok = tokenizers["sd15"]
    by_word = resolve(tok, "a cat and a frog", "cat, frog")
    by_index = resolve(tok, "a cat and a frog", "2,5")
    assert [s.token_positions for s in by_word.subjects] == [(2,), (5,)]
    assert [s.token_positions for s in by_index.subjects] == [(2,), (5,)]
    assert by_index.labels == ["cat", "frog"]
    assert by_word.end_positions == (6,)


def test_multi_piece_and_multi_word_subjects(tokenizers):
    tok = tokenizers["sd15"]
    sd_tok = tok.clip_l
    pieces = sd_tok.tokenizer("hedgehog")["input_ids"][1:-1]
    resolved = resolve(tok, "a red car next to a hedgehog", "red car, hedgehog")
    red_car, hedgehog = resolved.subjects
    assert red_car.token_positions == (2, 3)
    assert len(hedgehog.token_positions) == len(pieces)
    assert hedgehog.token_positions[0] == 7


def test_weighting_syntax_is_resolved_as_the_encoder_sees_it(tokenizers):
    tok = tokenizers["sd15"]
    resolved = resolve(tok, "a (cat:1.3) and a frog", "cat, frog")
    assert [s.token_positions for s in resolved.subjects] == [(2,), (5,)]
    weighted = tok.tokenize_with_weights("a (cat:1.3) and a frog")["l"][0]
    assert weighted[2][1] == pytest.approx(1.3)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families(tokenizers, family):
    resolved = resolve(tokenizers[family], "a cat and a frog", "cat, frog")
    assert [s.token_positions for s in resolved.subjects] == [(2,), (5,)]
    if family == "sdxl":  # both encoders tokenize the same way
        tokens = tokenizers[family].tokenize_with_weights("a cat and a frog")
        assert [t for t, _ in tokens["g"][0][:7]] == [t for t, _ in tokens["l"][0][:7]]


def test_second_chunk(tokenizers):
    tok = tokenizers["sd15"]
    filler = ", ".join(["a small stone"] * 20)
    text = f"{filler}, a frog"
    resolved = resolve(tok, text, "frog")
    (frog,) = resolved.subjects
    assert frog.chunk >= 1
    assert frog.token_positions[0] >= 77
    prompt = subjects_mod.tokenize_prompt(tok, text)
    chunk, position = divmod(frog.token_positions[0], 77)
    assert prompt.words[chunk][position] == "frog"


@pytest.mark.parametrize("spec, expected", [
    ("dog", ["'dog' is not in the prompt", "'cat'", "'frog'"]),
    ("cats", ["'cats' is not in the prompt"]),
    ("", ["no subjects given"]),
    (" , ", ["no subjects given"]),
    ("0", ["points at the start token", "valid content indices are 1..5"]),
    ("6", ["points at the end token", "1..5"]),
    ("40", ["points at padding"]),
    ("300", ["out of range", "1 chunk"]),
])
def test_errors_name_the_problem_and_the_valid_choices(tokenizers, spec, expected):
    with pytest.raises(SubjectError) as error:
        resolve(tokenizers["sd15"], "a cat and a frog", spec)
    for text in expected:
        assert text in str(error.value)


def test_a_word_does_not_match_the_tail_of_a_longer_word(tokenizers):
    tok = tokenizers["sd15"]
    sd_tok = tok.clip_l
    assert len(sd_tok.tokenizer("tomcat")["input_ids"]) > 3  # 'tom' + 'cat</w>': the trap exists
    resolved = resolve(tok, "a tomcat and a cat", "cat")
    prompt = subjects_mod.tokenize_prompt(tok, "a tomcat and a cat")
    (cat,) = resolved.subjects
    assert prompt.words[0][cat.token_positions[0]] == "cat"
    assert prompt.words[0][cat.token_positions[0] - 1] == "a"


def test_non_ascii_words_are_listed_readably(tokenizers):
    with pytest.raises(SubjectError) as error:
        resolve(tokenizers["sd15"], "a café and a frog", "dog")
    assert "'café'" in str(error.value)
