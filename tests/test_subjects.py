"""Subject words and indices resolve to the token positions the encoder sees (real shipped tokenizers)."""
import pytest
from harness import pack_module

subjects_mod = pack_module("text.subjects")
clip_tokens = pack_module("text.clip_tokens")
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
    # a multi-word entry is a subject group: the last word is the noun, the words before it its attributes
    assert red_car.label == "red car" and red_car.token_positions == (3,)
    assert [(a.label, a.token_positions) for a in red_car.attributes] == [("red", (2,))]
    assert len(hedgehog.token_positions) == len(pieces) and hedgehog.attributes == ()
    assert hedgehog.token_positions[0] == 7
    assert resolved.attributes == [(0, red_car.attributes[0])]
    assert resolved.other_positions() == [1, 4, 5, 6]  # a, next, to, a


def test_subject_groups(tokenizers):
    tok = tokenizers["sd15"]
    two = resolve(tok, "a red car and a blue bench", "red car, blue bench")
    assert [(s.token_positions, [a.token_positions for a in s.attributes]) for s in two.subjects] == \
        [((3,), [(2,)]), ((7,), [(6,)])]
    # the phrase as written wins over an earlier lone word; otherwise each word's first occurrence
    repeated = resolve(tok, "a blue sky over a big blue bench", "big blue bench")
    assert repeated.subjects[0].token_positions == (8,)
    assert [a.token_positions for a in repeated.subjects[0].attributes] == [(6,), (7,)]
    apart = resolve(tok, "a red shiny car", "red car")
    assert apart.subjects[0].token_positions == (4,) and apart.subjects[0].attributes[0].token_positions == (2,)
    # single words and indices as before
    assert resolve(tok, "a cat and a frog", "cat, 5").subjects[1].token_positions == (5,)
    with pytest.raises(SubjectError, match="its attribute 'green' is not in the prompt"):
        resolve(tok, "a red car", "green car")
    with pytest.raises(SubjectError, match="its noun 'boat' .* is not in the prompt"):
        resolve(tok, "a red car", "red boat")


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
    prompt = clip_tokens.tokenize_prompt(tok.clip_l, text)
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
    prompt = clip_tokens.tokenize_prompt(tok.clip_l, "a tomcat and a cat")
    (cat,) = resolved.subjects
    assert prompt.words[0][cat.token_positions[0]] == "cat"
    assert prompt.words[0][cat.token_positions[0] - 1] == "a"


def test_non_ascii_words_are_listed_readably(tokenizers):
    with pytest.raises(SubjectError) as error:
        resolve(tokenizers["sd15"], "a café and a frog", "dog")
    assert "'café'" in str(error.value)
