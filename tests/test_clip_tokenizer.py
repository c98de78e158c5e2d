"""CLIPTokenizer: ids, masks, padding and truncation identical to transformers' CLIPTokenizer on the real vocabulary."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_assets import EOS, write_clip_tokenizer
from diffusekit.hub import EntryNotFound
from diffusekit.models.clip_tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

SD_PROMPT = "a photo of an astronaut riding a horse on mars"
# ids of SD_PROMPT with openai/clip-vit-large-patch14's tokenizer (the SD 1.x tokenizer)
SD_PROMPT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]

BASE_PROMPTS = [
    "",
    " ",
    "\n\t  \r\n",
    "a",
    "A",
    "a photo of a cat",
    "A Photo Of A CAT",
    "A PHOTO OF AN ASTRONAUT RIDING A HORSE ON MARS",
    "a photo of an astronaut riding a horse on mars",
    "masterpiece, best quality, ultra-detailed, 8k, (portrait:1.2), [background], {cinematic}",
    "highly detailed digital painting, artstation, concept art, smooth, sharp focus, illustration",
    "oil painting of a fox by greg rutkowski and alphonse mucha, trending on artstation",
    "a cat; a dog: a bird - a fish / a frog \\ a cow | a pig",
    "hello world!",
    "hello world!!!",
    "wow!!! hello! !! ! !",
    "what?!?! really...",
    "end.",
    "...",
    "!!!",
    "!",
    "a ! b",
    "(((masterpiece)))",
    "<lora:add_detail:0.5>",
    "<cat-toy> on a beach",
    "1girl, solo, long hair",
    "1234567890",
    "3.14159 is pi",
    "$100 and 50% off, #1 #hashtag @user",
    "version 2.1 vs v1.5 vs SDXL 1.0",
    "1920x1080 16:9 aspect ratio",
    "room 101, 2nd floor, 3rd door, 4th window",
    "it's a dog's life",
    "I'M HERE, YOU'RE THERE, WE'VE GONE, THEY'LL COME, HE'D SAY, DON'T",
    "i'm you're we've they'll he'd don't can't won't shouldn't",
    "rock 'n' roll",
    "'quoted' \"double quoted\" `backticks`",
    "the cat's whiskers' tips",
    "O'Neil's pub",
    "l'été à paris",
    "café, naïve, résumé, jalapeño, über, fiancée",
    "CAFÉ NAÏVE RÉSUMÉ",
    "e\u0301le\u0300ve",  # decomposed accents (NFC composes them)
    "Ångström Ωmega Σίσυφος ΣΊΣΥΦΟΣ",
    "straße STRASSE",
    "İstanbul ıspanak",
    "Москва, красная площадь",
    "東京タワーの夜景",
    "一只可爱的猫",
    "고양이 사진",
    "แมวน่ารัก",
    "قطة لطيفة",
    "एक प्यारी बिल्ली",
    "emoji 😀😃😄 party 🎉🎊",
    "family 👩‍👩‍👧‍👦 and flags 🇯🇵🇫🇷",
    "thumbs 👍🏽 heart ❤️",
    "a\tb\tc",
    "line one\nline two\n\nline four",
    "  leading and trailing spaces  ",
    "many      spaces     between",
    "non\u00a0breaking\u2003em\u3000ideographic spaces",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "ﬁne ligatures ﬂow",
    "ℌ𝔢𝔩𝔩𝔬 𝕎𝕠𝕣𝕝𝕕",
    "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３",
    "superscripts x² y³ ½ ⅓ Ⅻ ①",
    "math: a+b=c, x*y, 2^10, a<b>c, ~tilde~",
    "under_score and hyphen-ated and dot.ted",
    "http://example.com/path?query=1&b=2#frag",
    "email@example.com",
    "C:\\Users\\name\\file.png",
    "<|startoftext|>",
    "<|endoftext|>",
    "x<|endoftext|>y",
    "a <|startoftext|> b <|endoftext|> c",
    "<|STARTOFTEXT|> <|EndOfText|>",
    "<|endoftext",
    "&amp; &lt;html&gt; &#39;",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "zzzzzz qqqq xxxxxx",
    "Mixed CASE words WiTh WeIrD cApS",
    "camelCaseWord and PascalCaseWord and snake_case_word",
    "the end of the world, as we know it.",
    "tab\tseparated\tvalues\t",
    "\u0000control\u0001chars\u007f",
    "r/StableDiffusion u/someone",
    "2024-01-31T12:34:56Z",
    "-5 degrees, +3 points, ±2",
    "no punctuation at all just words",
    ", , , , ,",
    "'s 't 're 've 'm 'll 'd",
    "''s ''t",
]

LONG_PROMPTS = [
    ", ".join(["a very detailed beautiful landscape with mountains and rivers"] * 12),
    " ".join(f"word{i}" for i in range(120)),
    "🎉" * 100,
    "a " * 76,
    "a " * 75,
    "a " * 74,
]


def _generated_prompts() -> list[str]:
    subjects = ["cat", "Dog", "ROBOT", "astronaut", "tree", "city"]
    styles = ["oil painting", "Photo", "3D render", "pixel-art", "watercolour"]
    extras = ["", "!", ", 4k", " (detailed:1.3)", "'s shadow", " 2nd", " café"]
    out = []
    for i, subject in enumerate(subjects):
        for j, style in enumerate(styles):
            out.append(f"{style} of a {subject}{extras[(i + j) % len(extras)]}")
    return out


PROMPTS = BASE_PROMPTS + LONG_PROMPTS + _generated_prompts()


def _fuzz_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = list("aAzZ09 '’\t\n\u00a0\u3000!?.,;:-_()[]<>|/\\\"#$%&*+=~`^@éÉñßİıΣσς東京한ไทعहि\u0301\u200b😀👩‍👧🇺🇸ﬁ①²Ａ")
    pool += ["'s", "'t", "'re", "'ll", "'D", EOS, "<|startoftext|>", "<|ENDOFTEXT|>", "photo", "cat"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip_tokenizers")
    return {
        "sd1": write_clip_tokenizer(root / "sd1"),
        "sd2": write_clip_tokenizer(root / "sd2", pad_token="!"),
    }


@pytest.fixture(scope="module")
def pairs(folders) -> dict[str, tuple[CLIPTokenizer, object]]:
    return {
        name: (CLIPTokenizer.from_pretrained(path), transformers.CLIPTokenizer.from_pretrained(path))
        for name, path in folders.items()
    }


def _same(ours, theirs) -> None:
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for key in theirs:
        a, b = ours[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), key
        elif isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), key
        else:
            assert a == b, key


# ---------------------------------------------------------------------------------------------------- parity


def test_known_ids_of_the_sd_prompt(pairs):
    ours, _ = pairs["sd1"]
    assert ours(SD_PROMPT).input_ids == SD_PROMPT_IDS
    assert ours(SD_PROMPT.upper() + "  ").input_ids == SD_PROMPT_IDS


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_prompt_ids_and_masks_match_transformers(pairs, name):
    ours, theirs = pairs[name]
    assert len(PROMPTS) >= 100
    for prompt in PROMPTS:
        a, b = ours(prompt), theirs(prompt)
        assert a.input_ids == b["input_ids"], prompt
        assert a.attention_mask == b["attention_mask"], prompt
        assert ours.tokenize(prompt) == theirs.tokenize(prompt), prompt


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_random_unicode_matches_transformers(pairs, name):
    ours, theirs = pairs[name]
    prompts = _fuzz_prompts(400, seed=1 if name == "sd1" else 2)
    assert ours(prompts).input_ids == theirs(prompts)["input_ids"]


def test_sd2_pad_token_cuts_exclamation_marks(pairs):
    sd1, _ = pairs["sd1"]
    sd2, _ = pairs["sd2"]
    assert (sd1.pad_token, sd1.pad_token_id) == (EOS, 49407)
    assert (sd2.pad_token, sd2.pad_token_id) == ("!", 0)
    # "!" is a special token in SD 2.x's tokenizer, so it is cut out whole (id 0) instead of BPE'd ("!</w>" = 256)
    assert sd1("hi!").input_ids[-2] == 256
    assert sd2("hi!").input_ids[-2] == 0
    assert sd2("hi!!!").input_ids.count(0) == 3


CALL_OPTIONS = [
    dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt"),  # SD pipelines
    dict(padding="longest", return_tensors="pt"),  # SD pipelines' untruncated check
    dict(padding="max_length", truncation=True),
    dict(padding="max_length", max_length=16, truncation=True, return_tensors="np"),
    dict(padding="max_length", max_length=16),  # no truncation: long rows stay long
    dict(padding=True, max_length=12, truncation=True),
    dict(padding=True, max_length=12),  # max_length ignored
    dict(padding=True),
    dict(padding="do_not_pad", truncation=True),
    dict(max_length=10),  # a bare max_length turns truncation on
    dict(max_length=10, truncation=False),
    dict(truncation="longest_first", max_length=5),
    dict(truncation=True, max_length=2),
    dict(truncation=True, max_length=1),  # too short for bos+eos: transformers leaves the rows whole
    dict(truncation=True),
    dict(add_special_tokens=False, padding="max_length", max_length=8, truncation=True),
    dict(return_attention_mask=False, padding=True),
    dict(return_length=True, padding="max_length", max_length=20, truncation=True),
]


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")  # transformers' own warning for padding=True
@pytest.mark.parametrize("options", CALL_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_batch_padding_and_truncation_match_transformers(pairs, name, options):
    ours, theirs = pairs[name]
    batch = ["a cat", "", "hello world!!", LONG_PROMPTS[0], "東京 😀", "a " * 75]
    if options.get("return_tensors") and options.get("padding") == "longest":
        batch = batch[:3] + batch[4:]
    _same(ours(batch, **options), dict(theirs(batch, **options)))
    for prompt in ("hello world!!", LONG_PROMPTS[1], ""):
        _same(ours(prompt, **options), dict(theirs(prompt, **options)))


def test_truncated_prompt_keeps_bos_and_eos(pairs):
    ours, _ = pairs["sd1"]
    ids = ours(LONG_PROMPTS[0], padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and 49407 not in ids[:-1]
    short = ours("a cat", padding="max_length", max_length=77, truncation=True)
    assert short.input_ids[:4] == [49406, 320, 2368, 49407]
    assert short.input_ids[4:] == [49407] * 73 and short.attention_mask == [1] * 4 + [0] * 73


def test_tensor_outputs(pairs):
    ours, _ = pairs["sd2"]
    enc = ours(["a cat", "a dog on a hill"], padding="max_length", max_length=77, truncation=True,
               return_tensors="pt")
    assert enc.input_ids.shape == (2, 77) and enc.input_ids.dtype == torch.long
    assert enc["attention_mask"].sum(1).tolist() == [4, 7]
    assert enc.input_ids[0, 4:].eq(0).all()  # SD 2.x pads with "!" (id 0)
    assert enc.to("cpu").input_ids is not None
    single = ours("a cat", return_tensors="np")
    assert single.input_ids.shape == (1, 4) and single.input_ids.dtype == np.int64
    with pytest.raises(ValueError, match="different lengths"):
        ours(["a", "a b c"], return_tensors="pt")
    with pytest.raises(AttributeError, match="no field"):
        enc.token_type_ids


def test_decode_matches_transformers(pairs):
    ours, theirs = pairs["sd1"]
    for prompt in PROMPTS[::3] + _fuzz_prompts(50):
        ids = theirs(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids), prompt
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), prompt
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    batch = ours([SD_PROMPT, "hello there"], padding=True, return_tensors="pt").input_ids
    assert ours.batch_decode(batch[:, 1:-1]) == theirs.batch_decode(batch[:, 1:-1])
    assert ours.decode(torch.tensor(320)) == theirs.decode(320) == "a"
    assert ours.convert_ids_to_tokens(320) == "a</w>"
    assert ours.decode(ours(SD_PROMPT).input_ids, skip_special_tokens=True) == SD_PROMPT


def test_vocabulary_properties(pairs):
    for ours, theirs in pairs.values():
        assert ours.vocab_size == theirs.vocab_size == 49408
        assert len(ours) == len(theirs) == 49408
        assert ours.model_max_length == theirs.model_max_length == 77
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "bos_token", "eos_token"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        assert ours.get_vocab() == theirs.get_vocab()
        assert ours.convert_tokens_to_ids(["a</w>", "no-such-token"]) == theirs.convert_tokens_to_ids(
            ["a</w>", "no-such-token"]
        )


def test_add_tokens_matches_transformers(folders):
    ours = CLIPTokenizer.from_pretrained(folders["sd1"])
    theirs = transformers.CLIPTokenizer.from_pretrained(folders["sd1"])
    assert ours.add_tokens(["<cat-toy>", "<sks>"]) == theirs.add_tokens(["<cat-toy>", "<sks>"]) == 2
    assert ours.add_tokens("<cat-toy>") == 0
    assert len(ours) == len(theirs) == 49410
    for prompt in ("a <cat-toy> on a <SKS> beach", "<cat-toy><sks>", "x<cat-toy>y"):
        assert ours(prompt).input_ids == theirs(prompt)["input_ids"]
    assert ours.convert_tokens_to_ids("<sks>") == 49409


def test_small_vocabulary_matches_transformers(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "small", num_merges=486)
    ours = CLIPTokenizer.from_pretrained(folder)
    theirs = transformers.CLIPTokenizer.from_pretrained(folder)
    assert len(ours) == 1000 and (ours.bos_token_id, ours.eos_token_id) == (998, 999)
    prompts = PROMPTS[:60] + _fuzz_prompts(100)
    options = dict(padding="max_length", max_length=77, truncation=True)
    assert ours(prompts, **options).input_ids == theirs(prompts, **options)["input_ids"]


# ---------------------------------------------------------------------------------------------------- files


def test_save_pretrained_writes_the_checkpoint_layout(pairs, folders, tmp_path):
    for name, (ours, _) in pairs.items():
        out = tmp_path / name
        written = ours.save_pretrained(out)
        assert sorted(Path(p).name for p in written) == sorted(p.name for p in folders[name].iterdir())
        for path in folders[name].iterdir():  # byte-identical to transformers 4.x's layout (the fixture's)
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
        reloaded = transformers.CLIPTokenizer.from_pretrained(out)
        again = CLIPTokenizer.from_pretrained(out)
        prompts = PROMPTS[::2]
        assert reloaded(prompts)["input_ids"] == ours(prompts).input_ids == again(prompts).input_ids
        assert reloaded.pad_token == ours.pad_token == again.pad_token


def test_added_tokens_survive_save(folders, tmp_path):
    ours = CLIPTokenizer.from_pretrained(folders["sd2"])
    ours.add_tokens(["<cat-toy>"])
    ours.save_pretrained(tmp_path)
    for loaded in (CLIPTokenizer.from_pretrained(tmp_path), transformers.CLIPTokenizer.from_pretrained(tmp_path)):
        assert loaded("a <cat-toy>!")["input_ids"] == [49406, 320, 49408, 0, 49407]


def test_loads_a_folder_saved_by_transformers_5(pairs, tmp_path):
    # transformers 5 writes tokenizer.json + tokenizer_config.json only (no vocab.json / merges.txt)
    for name, (_, theirs) in pairs.items():
        theirs.save_pretrained(tmp_path / name)
        assert not (tmp_path / name / "vocab.json").exists()
        ours = CLIPTokenizer.from_pretrained(tmp_path / name)
        assert ours.pad_token == theirs.pad_token and ours.model_max_length == 77
        prompts = PROMPTS + _fuzz_prompts(100)
        assert ours(prompts).input_ids == theirs(prompts)["input_ids"]


def test_loads_legacy_sd2_files(folders, tmp_path):
    # early SD 2.x repos: AddedToken objects in tokenizer_config.json, the "!" pad token only in
    # special_tokens_map.json, no added_tokens_decoder
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((folders["sd1"] / name).read_bytes())

    def token(content, **extra):
        return {**extra, "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    added = {"__type": "AddedToken"}
    config = {"add_prefix_space": False, "bos_token": token("<|startoftext|>", **added), "do_lower_case": True,
              "eos_token": token(EOS, **added), "errors": "replace", "model_max_length": 77,
              "name_or_path": "openai/clip-vit-large-patch14", "pad_token": EOS,
              "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
              "unk_token": token(EOS, **added)}
    special = {"bos_token": token("<|startoftext|>"), "eos_token": token(EOS), "pad_token": "!",
               "unk_token": token(EOS)}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    ours = CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    assert ours.pad_token == theirs.pad_token == "!"
    prompts = PROMPTS + _fuzz_prompts(100)
    options = dict(padding="max_length", truncation=True)
    assert ours(prompts, **options).input_ids == theirs(prompts, **options)["input_ids"]


def test_vocab_and_merges_only(folders, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folders["sd1"] / name).read_bytes())
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.model_max_length == theirs.model_max_length > 10**20
    prompts = PROMPTS + LONG_PROMPTS
    options = dict(padding="max_length", truncation=True)  # no model limit: neither pads nor cuts
    assert ours(prompts, **options).input_ids == theirs(prompts, **options)["input_ids"]


def test_from_pretrained_overrides(folders):
    ours = CLIPTokenizer.from_pretrained(folders["sd1"], model_max_length=10, pad_token="!")
    theirs = transformers.CLIPTokenizer.from_pretrained(folders["sd1"], model_max_length=10, pad_token="!")
    assert ours.model_max_length == 10 and ours.pad_token_id == theirs.pad_token_id == 0
    options = dict(padding="max_length", truncation=True)
    assert ours([SD_PROMPT, "a"], **options).input_ids == theirs([SD_PROMPT, "a"], **options)["input_ids"]
    with pytest.raises(TypeError, match="unexpected keyword"):
        CLIPTokenizer.from_pretrained(folders["sd1"], vocab_size=3)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_model_file_is_named(folders, tmp_path, missing):
    for path in folders["sd1"].iterdir():
        if path.name != missing:
            (tmp_path / path.name).write_bytes(path.read_bytes())
    with pytest.raises(EntryNotFound, match=missing.replace(".", r"\.")) as info:
        CLIPTokenizer.from_pretrained(tmp_path)
    assert "tokenizer.json" in str(info.value)


def test_corrupt_files_are_named(folders, tmp_path):
    for path in folders["sd1"].iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "vocab.json").write_text('{"a": 0,')
    with pytest.raises(ValueError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_bytes((folders["sd1"] / "vocab.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer.from_pretrained(tmp_path / "nowhere" / "tokenizer")


def test_bad_arguments(pairs):
    ours, _ = pairs["sd1"]
    with pytest.raises(TypeError, match="string or a list of strings"):
        ours(123)
    with pytest.raises(TypeError, match="string or a list of strings"):
        ours(["a", None])
    with pytest.raises(ValueError, match="empty"):
        ours([])
    with pytest.raises(ValueError, match="padding="):
        ours("a", padding="sideways")
    with pytest.raises(ValueError, match="truncation="):
        ours("a", truncation="only_second")
    with pytest.raises(ValueError, match="return_tensors="):
        ours("a", return_tensors="tf")


def test_works_without_transformers(folders):
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from diffusekit import CLIPTokenizer\n"
        f"tok = CLIPTokenizer.from_pretrained({str(folders['sd1'])!r})\n"
        f"assert tok({SD_PROMPT!r}).input_ids == {SD_PROMPT_IDS!r}\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
