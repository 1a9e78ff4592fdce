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


# --- a word at a named occurrence: 'word@N' -----------------------------------------------------------

REPEATED = "a red car next to a red bench"  # a 1, red 2, car 3, next 4, to 5, a 6, red 7, bench 8


def _groups(resolved):
    return [(s.label, s.token_positions, [(a.label, a.token_positions) for a in s.attributes])
            for s in resolved.subjects]


def test_a_word_at_a_position_names_that_occurrence(tokenizers):
    """'red@7 bench': the second 'red' of the prompt, which the word alone cannot name (its first occurrence is 2)."""
    tok = tokenizers["sd15"]
    assert _groups(resolve(tok, REPEATED, "red@7 bench, red@2 car")) == [
        ("red@7 bench", (8,), [("red", (7,))]), ("red@2 car", (3,), [("red", (2,))])]
    # an entry with a named occurrence is found word by word: the phrase 'red bench' would take 7, 'red@2' keeps 2
    assert _groups(resolve(tok, REPEATED, "red@2 bench")) == [("red@2 bench", (8,), [("red", (2,))])]
    assert _groups(resolve(tok, REPEATED, "red bench")) == [("red bench", (8,), [("red", (7,))])]  # as before
    # the noun, or a subject alone, at its occurrence
    assert _groups(resolve(tok, "a car and a car painted red", "red car@5, car@5")) == [
        ("red car@5", (5,), [("red", (7,))]), ("car@5", (5,), [])]
    assert resolve(tok, "a car and a car painted red", "red car").subjects[0].token_positions == (2,)
    # old entries resolve as they did: words, groups, indices
    assert _groups(resolve(tok, REPEATED, "red car, 7, bench")) == [
        ("red car", (3,), [("red", (2,))]), ("red", (7,), []), ("bench", (8,), [])]  # an index: its token's text


def test_a_named_occurrence_covers_all_of_a_words_pieces(tokenizers):
    tok = tokenizers["sd15"]
    pieces = len(tok.clip_l.tokenizer("tiramisu")["input_ids"][1:-1])
    assert pieces > 1
    text = "a tiramisu and a small tiramisu"
    second = 5 + pieces  # a, tiramisu's pieces, and, a, small
    assert resolve(tok, text, "small tiramisu").subjects[0].token_positions == tuple(range(second, second + pieces))
    assert resolve(tok, text, f"tiramisu@{second}").subjects[0].token_positions == tuple(range(second, second + pieces))
    assert resolve(tok, text, "tiramisu").subjects[0].token_positions == tuple(range(2, 2 + pieces))
    assert [a.token_positions for a in resolve(tok, text, f"small tiramisu@{second}").subjects[0].attributes] == \
        [(second - 1,)]
    with pytest.raises(SubjectError, match=rf"tiramisu@{second + 1} .* position {second + 1} .*starts at 2, {second}"):
        resolve(tok, text, f"tiramisu@{second + 1}")  # a position inside the word is not its start


def test_occurrences_in_a_second_chunk(tokenizers):
    tok = tokenizers["sd15"]
    text = ", ".join(["a small stone"] * 20) + ", a red frog"
    (frog,) = resolve(tok, text, "red frog").subjects
    assert frog.chunk >= 1
    red = frog.attributes[0].token_positions[0]
    assert resolve(tok, text, f"red@{red} frog").subjects[0].attributes[0].token_positions == (red,)
    stones = [positions[0] for positions in subjects_mod.occurrences(
        subjects_mod.model_text(tok, text).parts[0], "stone")]
    assert len(stones) == 20 and stones[0] == 3 and stones[-1] > 77
    assert resolve(tok, text, f"small stone@{stones[-1]}").subjects[0].token_positions == (stones[-1],)


@pytest.mark.parametrize("spec, expected", [
    ("red@4 bench", ["red@4", "position 4 holds 'next'", "'red' starts at 2, 7"]),
    ("red@40 bench", ["position 40 is not a word", "starts at 2, 7"]),
    ("red@300 bench", ["points past the model's text", "77 positions"]),
    ("green@2 car", ["'green' is not in the prompt", "'bench'"]),
    ("red@7 boat", ["its noun 'boat' is not in the prompt"]),
])
def test_a_wrong_position_says_where_the_word_is(tokenizers, spec, expected):
    with pytest.raises(SubjectError) as error:
        resolve(tokenizers["sd15"], REPEATED, spec)
    for text in expected:
        assert text in str(error.value)


def test_named_occurrences_on_sd3_and_flux():
    """SD3: the position may be a CLIP token or a T5 piece; the other part's same occurrence comes with it."""
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    sd3 = comfy.text_encoders.sd3_clip.SD3Tokenizer()
    phrase = resolve(sd3, REPEATED, "red bench").subjects[0]  # the second 'red' (CLIP 7 and its T5 piece)
    (clip_red, t5_red) = phrase.attributes[0].token_positions
    assert clip_red == 7 and t5_red >= 77
    for anchor in (clip_red, t5_red):
        got = resolve(sd3, REPEATED, f"red@{anchor} bench").subjects[0]
        assert got.token_positions == phrase.token_positions
        assert got.attributes[0].token_positions == (clip_red, t5_red)
    first = resolve(sd3, REPEATED, "red car").subjects[0].attributes[0].token_positions
    assert resolve(sd3, REPEATED, "red@2 bench").subjects[0].attributes[0].token_positions == first
    flux = comfy.text_encoders.flux.FluxTokenizer()
    t5 = resolve(flux, REPEATED, "red bench, red car").subjects
    second, first = t5[0].attributes[0].token_positions, t5[1].attributes[0].token_positions
    assert second != first
    assert resolve(flux, REPEATED, f"red@{first[0]} bench").subjects[0].attributes[0].token_positions == first
    assert resolve(flux, REPEATED, f"red@{second[0]} car").subjects[0].attributes[0].token_positions == second
