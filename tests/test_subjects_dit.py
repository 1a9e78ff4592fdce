"""Subjects of the DiT families resolve to the positions of the model's text sequence (ComfyUI's shipped tokenizers).

Flux.1 (FluxTokenizer) and Chroma (PixArtTokenizer): the T5 sequence only. SD3/SD3.5 (SD3Tokenizer): the CLIP
chunks, then the T5 sequence at 77 * chunks; a word has positions in both.
"""
import pytest
from harness import pack_module

subjects_mod = pack_module("text.subjects")
t5_tokens = pack_module("text.t5_tokens")
resolve = subjects_mod.resolve_subjects
SubjectError = subjects_mod.SubjectError
TextSegment = subjects_mod.TextSegment


@pytest.fixture(scope="module")
def flux():
    import comfy.text_encoders.flux
    return comfy.text_encoders.flux.FluxTokenizer()


@pytest.fixture(scope="module")
def sd3():
    import comfy.text_encoders.sd3_clip
    return comfy.text_encoders.sd3_clip.SD3Tokenizer()


@pytest.fixture(scope="module")
def chroma():
    import comfy.text_encoders.pixart_t5
    return comfy.text_encoders.pixart_t5.PixArtTokenizer()


def t5_pieces(tokenizer, text):
    """The T5 pieces of `text` up to `</s>`, straight from ComfyUI's tokenizer."""
    t5 = tokenizer.t5xxl if hasattr(tokenizer, "t5xxl") else tokenizer.clip_t5xxl
    ids = [t for t, _w in t5.tokenize_with_weights(text)[0]]
    return [t5.inv_vocab[i] for i in ids[:ids.index(t5.end_token)]]


def spelled(resolved, positions):
    """The word the pieces at `positions` spell (T5 pieces without their '▁'; CLIP tokens decoded)."""
    out = []
    for position in positions:
        segment = resolved.segments[resolved.segment_of(position)]
        piece = resolved.token_words[resolved.segment_of(position)][position - segment.start]
        out.append(piece.replace("▁", "") if segment.encoder == "t5" else piece)
    return "".join(out)


def by_encoder(resolved, positions):
    """{encoder: positions} of a subject's positions."""
    out = {}
    for position in positions:
        out.setdefault(resolved.segments[resolved.segment_of(position)].encoder, []).append(position)
    return out


# --- Flux: the T5 sequence -----------------------------------------------------------------------------

def test_flux_words_are_their_t5_pieces_without_a_bare_space(flux):
    text = "a cat and a frog"
    assert t5_pieces(flux, text) == ["▁", "a", "▁cat", "▁and", "▁", "a", "▁", "f", "rog"]  # the trap is real
    resolved = resolve(flux, text, "cat, frog")
    assert [s.token_positions for s in resolved.subjects] == [(2,), (7, 8)]  # frog: 'f', 'rog', not the bare '▁' at 6
    assert [spelled(resolved, s.token_positions) for s in resolved.subjects] == ["cat", "frog"]
    assert [s.chunk for s in resolved.subjects] == [0, 0]
    # the model's text is the T5 sequence: one segment, </s> at 9, padded with <pad> to Flux's 256
    assert resolved.segments == (TextSegment("t5", 0, 256, 9, (0, 9)),)
    assert resolved.chunk_length == 256 and resolved.end_positions == (9,) and resolved.num_tokens == 256
    words = resolved.token_words[0]
    assert words[9] == "</s>" and set(words[10:]) == {"<pad>"} and len(words) == 256
    # the other content positions: every piece that is neither subject's, the bare '▁' ones included
    assert resolved.other_positions() == [0, 1, 3, 4, 5, 6]


@pytest.mark.parametrize("text, word, pieces", [
    ("a hedgehog next to a tiramisu", "hedgehog", ["▁hedge", "hog"]),
    ("a hedgehog next to a tiramisu", "tiramisu", ["▁tir", "ami", "s", "u"]),
    ("a bullfrog and a frog", "frog", ["f", "rog"]),              # not the tail of 'bull|f|rog'
    ("a cat,frog", "frog", ["f", "rog"]),                          # after a comma: no '▁' at all
    ("a,cat and a cat", "cat", ["cat"]),                           # 'cat' (2138) after a comma, not '▁cat' (1712)
    ("a tomcat and a cat", "cat", ["▁cat"]),                       # not the tail of 'tomcat'
    ("café au lait", "lait", ["▁la", "it"]),
])
def test_flux_multi_piece_words_and_word_boundaries(flux, text, word, pieces):
    resolved = resolve(flux, text, word)
    (subject,) = resolved.subjects
    assert [resolved.token_words[0][p] for p in subject.token_positions] == pieces
    assert spelled(resolved, subject.token_positions) == word
    all_pieces = t5_pieces(flux, text)
    assert all_pieces[subject.token_positions[0]:subject.token_positions[-1] + 1] == pieces


def test_flux_repeated_words_first_occurrence_and_groups_as_written(flux):
    twice = resolve(flux, "a cat and a frog and a cat", "cat")
    assert twice.subjects[0].token_positions == (2,)
    # the phrase as written wins over an earlier lone word
    text = "a blue sky over a big blue bench"
    pieces = t5_pieces(flux, text)
    (group,) = resolve(flux, text, "big blue bench").subjects
    assert [pieces[p] for p in group.token_positions] == ["▁bench"]
    assert [(a.label, [pieces[p] for p in a.token_positions]) for a in group.attributes] == \
        [("big", ["▁big"]), ("blue", ["▁blue"])]
    assert group.attributes[1].token_positions[0] > pieces.index("▁blue")  # the second 'blue', the phrase's
    # else each word at its own first occurrence
    (apart,) = resolve(flux, "a red shiny car", "red car").subjects
    assert spelled(resolve(flux, "a red shiny car", "car"), apart.token_positions) == "car"
    assert [a.token_positions for a in apart.attributes] == [(t5_pieces(flux, "a red shiny car").index("▁red"),)]
    # a word's case does not matter (CLIP lower-cases the prompt too): the first 'Frog' is the one
    capital = resolve(flux, "A Frog. frog", "frog")
    assert [capital.token_words[0][p] for p in capital.subjects[0].token_positions] == ["▁F", "rog"]


def test_flux_subject_groups_with_attributes(flux):
    resolved = resolve(flux, "a red car and a blue bench", "red car, blue bench")
    pieces = t5_pieces(flux, "a red car and a blue bench")
    assert [(s.label, [pieces[p] for p in s.token_positions], [(a.label, [pieces[p] for p in a.token_positions])
                                                             for a in s.attributes]) for s in resolved.subjects] == [
        ("red car", ["▁car"], [("red", ["▁red"])]), ("blue bench", ["▁bench"], [("blue", ["▁blue"])])]
    with pytest.raises(SubjectError, match="its attribute 'green' is not in the T5 text"):
        resolve(flux, "a red car", "green car")
    with pytest.raises(SubjectError, match="its noun 'boat' .* is not in the T5 text"):
        resolve(flux, "a red car", "red boat")


def test_flux_weighting_syntax_is_resolved_as_the_encoder_sees_it(flux):
    text = "a (frog:1.2) and a cat"
    resolved = resolve(flux, text, "frog, cat")
    frog, cat = resolved.subjects
    weighted = flux.tokenize_with_weights(text)["t5xxl"][0]
    assert spelled(resolved, frog.token_positions) == "frog" and spelled(resolved, cat.token_positions) == "cat"
    assert [weighted[p][1] for p in frog.token_positions] == [pytest.approx(1.2)] * 2
    assert weighted[cat.token_positions[0]][1] == pytest.approx(1.0)
    # ComfyUI tokenizes each weighting segment on its own: the weighted 'frog' gets a bare '▁' of its own
    assert resolved.token_words[0][frog.token_positions[0] - 1] == "▁"


def test_flux_long_prompt_is_one_longer_sequence(flux):
    filler = ", ".join(["a small stone"] * 60)
    text = f"{filler}, a hedgehog next to a frog"
    pieces = t5_pieces(flux, text)
    assert len(pieces) > 256  # longer than Flux's min_length: the sequence grows, no chunks, no padding
    resolved = resolve(flux, text, "hedgehog, frog")
    assert resolved.segments == (TextSegment("t5", 0, len(pieces) + 1, len(pieces), (0, len(pieces))),)
    assert resolved.chunk_length == len(pieces) + 1 and resolved.end_positions == (len(pieces),)
    hedgehog, frog = resolved.subjects
    assert hedgehog.token_positions[0] > 256 and frog.token_positions[-1] == len(pieces) - 1
    assert [spelled(resolved, s.token_positions) for s in resolved.subjects] == ["hedgehog", "frog"]
    assert resolve(flux, text, str(len(pieces) - 1)).subjects[0].label == "rog"


def test_flux_token_indices_index_the_t5_sequence(flux):
    resolved = resolve(flux, "a cat and a frog", "2, 8")
    assert [(s.label, s.token_positions) for s in resolved.subjects] == [("cat", (2,)), ("rog", (8,))]


def test_chroma_t5_without_padding(chroma):
    resolved = resolve(chroma, "a cat and a frog", "frog")
    assert resolved.segments == (TextSegment("t5", 0, 10, 9, (0, 9)),)  # PixArtTokenizer: min_length 1
    assert resolved.subjects[0].token_positions == (7, 8)


# --- SD3: CLIP chunks, then T5 -------------------------------------------------------------------------

def test_sd3_words_have_clip_and_t5_positions(sd3):
    resolved = resolve(sd3, "a cat and a frog", "cat, frog")
    assert resolved.segments == (TextSegment("clip", 0, 77, 6, (1, 76)), TextSegment("t5", 77, 77, 9, (0, 9)))
    assert resolved.chunk_length == 77 and resolved.end_positions == (6,) and resolved.num_tokens == 154
    cat, frog = resolved.subjects
    assert by_encoder(resolved, cat.token_positions) == {"clip": [2], "t5": [77 + 2]}
    assert by_encoder(resolved, frog.token_positions) == {"clip": [5], "t5": [77 + 7, 77 + 8]}
    assert resolved.token_words[0][2] == "cat" and resolved.token_words[1][2] == "▁cat"
    assert spelled(resolved, by_encoder(resolved, frog.token_positions)["t5"]) == "frog"
    assert [s.chunk for s in resolved.subjects] == [0, 0]
    # CLIP-L and CLIP-G tokenize alike; the cond is their chunks then T5's (SD3ClipModel.encode_token_weights)
    tokens = sd3.tokenize_with_weights("a cat and a frog")
    assert [t for t, _ in tokens["l"][0][:7]] == [t for t, _ in tokens["g"][0][:7]]
    assert len(tokens["t5xxl"][0]) == 77


def test_sd3_long_prompt_t5_starts_after_two_clip_chunks(sd3):
    filler = ", ".join(["a small stone"] * 20)
    text = f"{filler}, a hedgehog next to a frog"
    resolved = resolve(sd3, text, "hedgehog, frog")
    clip = [s for s in resolved.segments if s.encoder == "clip"]
    (t5,) = [s for s in resolved.segments if s.encoder == "t5"]
    pieces = t5_pieces(sd3, text)
    assert [(s.start, s.length) for s in clip] == [(0, 77), (77, 77)]
    assert t5 == TextSegment("t5", 154, len(pieces) + 1, len(pieces), (0, len(pieces))) and len(pieces) > 77
    for subject in resolved.subjects:
        positions = by_encoder(resolved, subject.token_positions)
        assert all(77 < p < 154 for p in positions["clip"]) and all(p >= 154 for p in positions["t5"])
        assert spelled(resolved, positions["clip"]) == spelled(resolved, positions["t5"]) == subject.label
        assert subject.chunk == 1  # its first position is in CLIP chunk 1
    # an index past the CLIP part is a T5 piece
    index = 154 + pieces.index("▁hedge")
    assert resolve(sd3, text, str(index)).subjects[0].label == "hedge"


def test_sd3_groups_and_weighting(sd3):
    text = "a (red car:1.1) and a blue bench"
    resolved = resolve(sd3, text, "red car, blue bench")
    for subject, (noun, attribute) in zip(resolved.subjects, [("car", "red"), ("bench", "blue")]):
        positions = by_encoder(resolved, subject.token_positions)
        assert len(positions["clip"]) == 1 and len(positions["t5"]) == 1
        assert spelled(resolved, positions["clip"]) == spelled(resolved, positions["t5"]) == noun
        (attr,) = subject.attributes
        attr_positions = by_encoder(resolved, attr.token_positions)
        assert spelled(resolved, attr_positions["clip"]) == spelled(resolved, attr_positions["t5"]) == attribute
    weighted = sd3.tokenize_with_weights(text)["t5xxl"][0]
    red = by_encoder(resolved, resolved.subjects[0].attributes[0].token_positions)["t5"][0] - 77
    assert weighted[red][1] == pytest.approx(1.1)


def test_sd3_without_t5_or_without_clip(sd3):
    clip_only = resolve(sd3, "a cat and a frog", "frog", encoders={"clip_l", "clip_g"})
    assert clip_only.segments == (TextSegment("clip", 0, 77, 6, (1, 76)),)
    assert clip_only.subjects[0].token_positions == (5,)
    with pytest.raises(SubjectError, match="no T5-XXL loaded"):
        resolve(sd3, "a cat and a frog", "80", encoders={"clip_l"})
    t5_only = resolve(sd3, "a cat and a frog", "frog", encoders={"t5xxl"})
    assert t5_only.segments == (TextSegment("t5", 0, 77, 9, (0, 9)),) and t5_only.subjects[0].token_positions == (7, 8)
    assert t5_only.chunk_length == 77 and t5_only.end_positions == (9,)
    with pytest.raises(SubjectError, match="none of its text encoders loaded"):
        resolve(sd3, "a cat", "cat", encoders=set())


def test_sd3_clip_model_tells_which_encoders_are_loaded():
    import comfy.text_encoders.sd3_clip
    model = comfy.text_encoders.sd3_clip.SD3ClipModel(clip_l=False, clip_g=False, t5=False)  # builds no encoder
    assert subjects_mod.text_encoders(type("Clip", (), {"cond_stage_model": model})()) == frozenset()
    assert subjects_mod.text_encoders(object()) is None


def test_the_tokenizer_options_of_a_clip_change_the_padding(flux):
    resolved = resolve(flux, "a cat", "cat", tokenizer_options={"t5xxl_min_length": 300})
    assert resolved.segments == (TextSegment("t5", 0, 300, 3, (0, 3)),)


# --- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, spec, expected", [
    ("flux", "dog", ["'dog' is not in the T5 text", "'cat'", "'frog'", "T5 pieces", "'▁cat'", "'rog'"]),
    ("flux", "cats", ["'cats' is not in the T5 text"]),
    ("flux", "300", ["out of range", "Flux attends only the T5 text", "0..255", "valid content indices are 0..8 (T5)"]),
    ("flux", "256", ["out of range"]),
    ("flux", "6", ["bare '▁'", "before 'frog'", "7, 8"]),
    ("flux", "9", ["points at the end token of the T5 text"]),
    ("flux", "40", ["points at padding of the T5 text"]),
    ("flux", "猫", ["T5 does not know", "<unk>"]),
    ("sd3", "200", ["out of range", "CLIP 0..76, T5 77..153", "1..5 (CLIP), 77..85 (T5)"]),
    ("sd3", "0", ["points at the start token of CLIP chunk 0"]),
    ("sd3", "40", ["points at padding of CLIP chunk 0"]),
    ("sd3", "86", ["points at the end token of the T5 text"]),
    ("sd3", "83", ["bare '▁'"]),
    ("sd3", "dog", ["'dog' is not in the prompt", "'frog'"]),
    ("sd3", "猫", ["T5 does not know"]),  # CLIP's byte-level BPE has it; T5 reads <unk>
])
def test_errors_name_the_problem_and_what_is_valid(flux, sd3, family, spec, expected):
    tokenizer = {"flux": flux, "sd3": sd3}[family]
    with pytest.raises(SubjectError) as error:
        resolve(tokenizer, "a cat and a frog 猫" if spec == "猫" and family == "sd3" else "a cat and a frog", spec)
    for text in expected:
        assert text in str(error.value), str(error.value)


def test_a_subject_in_clip_but_not_in_t5_is_an_error(sd3):
    """'猫' is in SD3's CLIP tokens (byte-level BPE) but T5 reads <unk>: the T5 view would be missing."""
    clip_only = resolve(sd3, "a 猫 and a frog", "猫", encoders={"clip_l", "clip_g"})
    assert len(clip_only.subjects[0].token_positions) >= 1
    with pytest.raises(SubjectError, match="T5 does not know"):
        resolve(sd3, "a 猫 and a frog", "猫")


@pytest.mark.parametrize("module, name, encoder", [
    ("comfy.text_encoders.qwen_image", "QwenImageTokenizer", "qwen25_7b"),
    ("comfy.text_encoders.z_image", "ZImageTokenizer", "qwen3_4b"),
    ("comfy.text_encoders.aura_t5", "AuraT5Tokenizer", "clip_pile_t5xl"),
])
def test_unsupported_families_are_named_with_the_ones_that_work(module, name, encoder):
    tokenizer = getattr(pytest.importorskip(module, reason=f"this host has no {module}"), name)()
    with pytest.raises(SubjectError) as error:
        resolve(tokenizer, "a cat", "cat")
    message = str(error.value)
    assert name in message and encoder in message
    for family in ("SD1.x", "SD2.x", "SDXL", "SD3/SD3.5", "Flux.1", "Chroma", "Qwen-Image", "HiDream"):
        assert family in message


def test_the_families_are_told_from_the_tokenizer(flux, sd3, chroma):
    import comfy.sd1_clip
    import comfy.sdxl_clip
    assert subjects_mod.text_family(flux)[0] == "flux" and subjects_mod.text_family(sd3)[0] == "sd3"
    assert subjects_mod.text_family(chroma)[0] == "t5"
    assert subjects_mod.text_family(comfy.sdxl_clip.SDXLTokenizer())[0] == "clip"
    assert subjects_mod.text_family(comfy.sd1_clip.SD1Tokenizer())[0] == "clip"
    assert subjects_mod.text_family(flux.t5xxl)[0] == "t5"  # a bare T5 tokenizer
    assert t5_tokens.piece_text("▁cat") == "cat" and t5_tokens.piece_text("▁") == "▁"


# --- with the tiny CLIPs: the positions index the cond the encoder makes -------------------------------

@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_attention_text_encode_positions_index_the_cond(tiny, family):
    """The cond's token axis is the model's text sequence: Flux the T5 sequence, SD3 the CLIP chunks then T5
    (SD3ClipModel cats the padded CLIP-L/G features and the T5 output over the tokens); without T5-XXL loaded an
    SD3 CLIP's cond is the CLIP part only, and the CLIP itself tells the resolution so."""
    node = pack_module("nodes.text_encode").AttentionTextEncode
    clip = tiny.make_clip(family)
    text = ", ".join(["a small stone"] * 20) + ", a hedgehog next to a frog"  # SD3: 2 CLIP chunks
    conditioning, resolved = node.execute(clip=clip, text=text, subjects="hedgehog, frog").args
    cond = conditioning[0][0]
    assert cond.shape[1] == resolved.num_tokens == sum(s.length for s in resolved.segments)
    assert [s.encoder for s in resolved.segments] == (["t5"] if family == "flux" else ["clip", "clip", "t5"])
    # the T5 segment's rows are the T5 encoder's output for those tokens
    t5 = resolved.segments[-1]
    tokens = clip.tokenize(text)
    t5_out = clip.cond_stage_model.t5xxl.encode_token_weights(tokens["t5xxl"])[0]
    assert torch_equal(cond[:, t5.start:t5.start + t5.length], t5_out)
    assert subjects_mod.text_encoders(clip) == (frozenset({"clip_l", "t5xxl"}) if family == "flux"
                                                else frozenset({"clip_l", "clip_g", "t5xxl"}))
    if family == "sd3":
        clip.cond_stage_model.t5xxl = None  # as a CLIP loaded without T5-XXL (sd3_clip(t5=False)) has it
        without = resolve(clip, text, "frog")
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]
        assert cond.shape[1] == without.num_tokens == 154 and [s.encoder for s in without.segments] == ["clip"] * 2
        assert without.subjects[0].token_positions == tuple(p for p in resolved.subjects[1].token_positions if p < 154)


def torch_equal(a, b):
    import torch
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), atol=1e-5))
