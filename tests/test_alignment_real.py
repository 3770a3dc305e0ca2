"""Token alignment on the real tokenizer pair: Gemma-3 (SentencePiece, 262k) <-> SmolLM2 (BPE, 49k).

The full vocabulary maps are built once and cached on disk (the same cache the runs use), so only
the first session pays for them; exactness is checked on random samples against brute force.
"""

import random

import numpy as np
import pytest
import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from fedmkt.alignment import TokenAligner, load_or_build_vocab_map, vocab_strings
from fedmkt.alignment.tokens import special_token_ids
from fedmkt.alignment.vocab_map import mapping_candidates

try:
    import reference_alignment as ref
except ImportError:  # tests/ imported as a package
    from tests import reference_alignment as ref

pytestmark = pytest.mark.slow

SAMPLE = 2000


@pytest.fixture(scope="session")
def real_pair():
    from fedmkt.config import ModelSpec
    from fedmkt.models import cache_root, load_tokenizer

    gemma = load_tokenizer(ModelSpec("embedded:gemma3-270m"))
    smol = load_tokenizer(ModelSpec("embedded:smollm2-135m-instruct"))
    cache = cache_root() / "vocab_maps"
    strings = {"gemma": vocab_strings(gemma), "smol": vocab_strings(smol)}
    maps = {
        ("gemma", "smol"): load_or_build_vocab_map(
            gemma, smol, cache, src_strings=strings["gemma"], dst_strings=strings["smol"]
        ).numpy(),
        ("smol", "gemma"): load_or_build_vocab_map(
            smol, gemma, cache, src_strings=strings["smol"], dst_strings=strings["gemma"]
        ).numpy(),
    }
    return {"gemma": gemma, "smol": smol, "strings": strings, "maps": maps, "cache": cache}


def _candidates(real_pair, name: str) -> list[str]:
    """What the map may choose from: no special tokens, no byte fallback shadowed by an ordinary token."""
    tokenizer, strings = real_pair[name], real_pair["strings"][name]
    candidates = mapping_candidates(strings, tokenizer.convert_ids_to_tokens(list(range(len(strings)))))
    special = special_token_ids(tokenizer)
    return ["" if i in special else text for i, text in enumerate(candidates)]


@pytest.mark.parametrize(("src", "dst"), [("gemma", "smol"), ("smol", "gemma")])
def test_min_distance_equals_brute_force_on_a_sample(real_pair, src, dst):
    src_strings, dst_strings = real_pair["strings"][src], real_pair["strings"][dst]
    mapping = real_pair["maps"][(src, dst)]
    assert mapping.shape == (len(src_strings),) and mapping.dtype == np.int64
    src_special = special_token_ids(real_pair[src])
    sample = [
        i for i in random.Random(0).sample(range(len(src_strings)), SAMPLE) if src_strings[i] and i not in src_special
    ]
    candidates = [s for s in _candidates(real_pair, dst) if s]
    brute = process.cdist(
        [src_strings[i] for i in sample], candidates, scorer=Levenshtein.distance, dtype=np.int32, workers=-1
    ).min(axis=1)
    ours = [Levenshtein.distance(src_strings[i], dst_strings[mapping[i]]) for i in sample]
    assert ours == brute.tolist()


@pytest.mark.parametrize(("src", "dst", "count"), [("gemma", "smol", 20), ("smol", "gemma", 8)])
def test_tie_break_equals_reference_on_a_sample(real_pair, src, dst, count):
    src_strings, dst_strings = real_pair["strings"][src], real_pair["strings"][dst]
    exact = set(dst_strings)
    src_special = special_token_ids(real_pair[src])
    pool = [
        i for i, s in enumerate(src_strings) if s and s not in exact and i not in src_special
    ]  # the interesting ones
    sample = random.Random(1).sample(pool, count)
    candidates = _candidates(real_pair, dst)
    expected = ref.vocab_map([src_strings[i] for i in sample], candidates, Levenshtein.distance)
    assert real_pair["maps"][(src, dst)][sample].tolist() == expected


def test_word_boundaries_and_newlines_meet(real_pair):
    smol, gemma = real_pair["smol"], real_pair["gemma"]
    to_gemma = real_pair["maps"][("smol", "gemma")]
    pairs = [("Ġthe", "▁the"), ("Ċ", "\n"), ("ĠĠ", "▁▁"), ("Ġquick", "▁quick")]
    # Punctuation lands on Gemma's own tokens, not on the byte fallbacks <0x2C>/<0x3A>/<0x2D>
    # that share their text but that Gemma never predicts (a KD target there costs ~30 nats).
    pairs += [(",", ","), (":", ":"), ("-", "-"), ("?", "?"), (".", ".")]
    for smol_token, gemma_token in pairs:
        mapped = to_gemma[smol.convert_tokens_to_ids(smol_token)]
        assert gemma.convert_ids_to_tokens(int(mapped)) == gemma_token


def test_special_tokens_map_only_to_the_same_special(real_pair):
    smol, gemma = real_pair["smol"], real_pair["gemma"]
    to_gemma, to_smol = real_pair["maps"][("smol", "gemma")], real_pair["maps"][("gemma", "smol")]
    # SmolLM2's end of turn has no spelled twin in Gemma: unmapped (its KD slot is dropped), not
    # the edit-distance neighbour <unused0> that Gemma gives ~1e-14 probability.
    for token in ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]:
        assert to_gemma[smol.convert_tokens_to_ids(token)] == -1
    for token in ["<eos>", "<bos>", "<end_of_turn>", "<unused0>"]:
        assert to_smol[gemma.convert_tokens_to_ids(token)] == -1
    # No ordinary token lands on a special one in either direction.
    assert not set(to_gemma[to_gemma >= 0].tolist()) & special_token_ids(gemma)
    assert not set(to_smol[to_smol >= 0].tolist()) & special_token_ids(smol)


def test_second_build_is_a_cache_hit_that_equals_a_fresh_build(real_pair, tmp_path, monkeypatch):
    """SmolLM2 -> Gemma-3 (the cheap direction, seconds) built into an empty cache, then asked for again."""
    from fedmkt.alignment import vocab_map

    builds = []
    build = vocab_map.build_vocab_map
    monkeypatch.setattr(vocab_map, "build_vocab_map", lambda *a, **kw: builds.append(1) or build(*a, **kw))
    smol, gemma, strings = real_pair["smol"], real_pair["gemma"], real_pair["strings"]
    fresh = load_or_build_vocab_map(smol, gemma, tmp_path, src_strings=strings["smol"], dst_strings=strings["gemma"])
    (cache_file,) = tmp_path.glob("*.npy")
    assert len(builds) == 1
    # The session's map (from the shared on-disk cache the runs use) is what a build from scratch gives.
    assert torch.equal(fresh, torch.from_numpy(real_pair["maps"][("smol", "gemma")]))

    again = load_or_build_vocab_map(smol, gemma, tmp_path)
    assert len(builds) == 1, "the second call rebuilt the map instead of loading it"
    assert torch.equal(again, fresh)
    # It is the file that answers: an edited cache entry comes back as written.
    edited = fresh.numpy().copy()
    edited[0] = 7
    np.save(cache_file, edited, allow_pickle=False)
    assert load_or_build_vocab_map(smol, gemma, tmp_path)[0].item() == 7 and len(builds) == 1


@pytest.mark.parametrize(("teacher", "receiver"), [("gemma", "smol"), ("smol", "gemma")])
def test_token_aligner_on_a_real_sentence(real_pair, teacher, receiver):
    t_tok, r_tok = real_pair[teacher], real_pair[receiver]
    aligner = TokenAligner(t_tok, r_tok, real_pair["cache"])
    text = "Question: Which gas do plants absorb from the air?\nAnswer: carbon dioxide"
    t_ids = torch.tensor(t_tok(text, add_special_tokens=False).input_ids)
    r_ids = torch.tensor(r_tok(text, add_special_tokens=False).input_ids)
    k = 4
    top_ids = torch.stack([torch.roll(t_ids, -1), t_ids, t_ids, t_ids], dim=1)  # "predicts" the next token
    top_logits = torch.tensor([[3.0, 0.0, -1.0, -2.0]]).expand(len(t_ids), k)
    ((ids, probs),) = aligner.align([t_ids], [top_ids], [top_logits], [r_ids])
    assert ids.shape == probs.shape == (len(r_ids), k)
    sums = probs.sum(1)
    assert torch.allclose(sums[:-1], torch.ones(len(r_ids) - 1))
    matched = aligner.match_positions(t_ids, r_ids)
    # Both tokenizers cut this sentence into the same 16 pieces, so every position is one-to-one,
    # and the teacher's favourite next token lands exactly on the receiver's own next token,
    # punctuation included (":" and "?" once went to Gemma's byte fallbacks <0x3A>/<0x3F>).
    assert bool((matched >= 0).all())
    assert all(ids[i, 0].item() == r_ids[i + 1].item() for i in range(len(r_ids) - 1))


def _offset_mapping_ends(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Ids and each token's end character from the fast tokenizer's own offset mapping.

    Independent of fedmkt's byte tables: special tokens report ``(0, 0)``, so a special token after
    the start is given the end of the token before it (it takes no room in the text).
    """
    encoded = tokenizer(text, return_offsets_mapping=True)
    ends: list[int] = []
    for start, end in encoded.offset_mapping:
        ends.append(ends[-1] if start == end == 0 and ends else end)
    return list(encoded.input_ids), ends


DIFFERENTLY_SPLIT = [
    "Why do Planets orbit the sun? Photosynthesis is unbelievably naïve: 東京 costs ¥12345 — ok.\n\nAnswer: yes",
    "Question: Is the Eiffel Tower taller than 300 metres?\nAnswer: no",
]


@pytest.mark.parametrize("text", DIFFERENTLY_SPLIT)
@pytest.mark.parametrize(("teacher", "receiver"), [("gemma", "smol"), ("smol", "gemma")])
def test_offsets_mode_equals_the_offset_mapping_oracle(real_pair, teacher, receiver, text):
    t_tok, r_tok = real_pair[teacher], real_pair[receiver]
    t_ids, t_ends = _offset_mapping_ends(t_tok, text)
    r_ids, r_ends = _offset_mapping_ends(r_tok, text)
    oracle = ref.offset_oracle(t_ends, r_ends)
    aligner = TokenAligner(t_tok, r_tok, real_pair["cache"], "offsets")
    got = aligner.match_positions(torch.tensor(t_ids), torch.tensor(r_ids)).tolist()
    assert got == oracle
    assert set(t_ends) != set(r_ends)  # the two tokenizers do split this text differently
    assert all(j < 0 or r_ends[i] == t_ends[j] for i, j in enumerate(got))
    # DTW keeps only pairs the oracle also makes: never a pair ending at different characters.
    dtw = TokenAligner(t_tok, r_tok, real_pair["cache"], "dtw").match_positions(
        torch.tensor(t_ids), torch.tensor(r_ids)
    )
    assert all(j < 0 or j == o for j, o in zip(dtw.tolist(), oracle))


@pytest.mark.parametrize("mode", ["dtw", "offsets"])
def test_a_piece_of_a_word_never_takes_the_whole_word(real_pair, mode):
    # SmolLM2 cuts " Planets" as "ĠPlan|ets", Gemma keeps "▁Planets": after "ĠPlan" the next token
    # is "ets", so Gemma's distribution after "▁Planets" must not be its target.
    gemma, smol = real_pair["gemma"], real_pair["smol"]
    text = "Why do Planets orbit"
    g_ids = torch.tensor(gemma(text, add_special_tokens=False).input_ids)
    s_ids = torch.tensor(smol(text, add_special_tokens=False).input_ids)
    assert smol.convert_ids_to_tokens(s_ids.tolist()) == ["Why", "Ġdo", "ĠPlan", "ets", "Ġorbit"]
    assert gemma.convert_ids_to_tokens(g_ids.tolist()) == ["Why", "▁do", "▁Planets", "▁orbit"]
    matched = TokenAligner(gemma, smol, real_pair["cache"], mode).match_positions(g_ids, s_ids).tolist()
    assert matched[2] == -1
    assert matched[:2] == [0, 1] and matched[4] == 3
    # "ets" ends where "▁Planets" ends: matched by offsets; DTW pairs it with "▁Planets" too.
    assert matched[3] == (2 if mode == "offsets" else matched[3])


def test_offsets_mode_survives_prompts_cut_from_the_left(real_pair):
    from fedmkt.data.tokenize import encode_prompt_answer

    gemma, smol = real_pair["gemma"], real_pair["smol"]
    prompt = (
        "Passage: "
        + "Planets orbit stars and moons orbit planets. " * 20
        + "\nQuestion: do planets orbit stars?\nAnswer:"
    )
    g_ids, _ = encode_prompt_answer(gemma, prompt, " yes", max_length=64)
    s_ids, _ = encode_prompt_answer(smol, prompt, " yes", max_length=50)
    matched = TokenAligner(smol, gemma, real_pair["cache"], "offsets").match_positions(s_ids, g_ids)
    # Gemma keeps more of the passage; the part both kept lines up again from where SmolLM2's starts.
    assert (matched >= 0).sum().item() >= 40
    assert matched[-1].item() == len(s_ids) - 1
