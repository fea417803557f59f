"""Caption-states files (``magi1.prompts.caption_states``): what is saved loads back bit for bit, every malformed file
is refused naming the file and the problem, nothing is unpickled; and MAGI-1 Save Caption States writes a
file whose captions are the ones MAGI-1 Sampler builds from the same CONDITIONING."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from comfy_stubs import pack_namespace
from magi1 import scheduled_captions
from magi1 import builtin
from magi1.prompts.caption_states import CaptionStates, load_caption_states, save_caption_states


def prompt(length, valid, width=16, dtype=torch.float32, seed=0):
    states = torch.randn(length, width, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return states, torch.arange(length) < valid


SCHEDULE = [(0, *prompt(7, 5, seed=1)), (2, *prompt(9, 9, dtype=torch.bfloat16, seed=2)),
            (5, *prompt(4, 1, dtype=torch.float16, seed=3))]
NEGATIVE = [(0, *prompt(6, 3, seed=4))]


def assert_same(loaded, saved):
    assert len(loaded) == len(saved)
    for (first, states, mask), (want_first, want_states, want_mask) in zip(loaded, saved):
        assert first == want_first and states.dtype == want_states.dtype and mask.dtype == torch.bool
        assert torch.equal(states, want_states) and torch.equal(mask, want_mask)


def test_round_trip_of_a_schedule_and_a_negative(tmp_path):
    path = tmp_path / "states.safetensors"
    save_caption_states(path, SCHEDULE, NEGATIVE)
    loaded = load_caption_states(path)
    assert_same(loaded.positive, SCHEDULE)
    assert_same(loaded.negative, NEGATIVE)
    assert loaded.width == 16 and loaded.unused_prompts(3) == [5] and loaded.unused_prompts(6) == []


def test_round_trip_of_a_plain_prompt_without_negative(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_caption_states(path, SCHEDULE[:1])
    loaded = load_caption_states(str(path))
    assert_same(loaded.positive, SCHEDULE[:1])
    assert loaded.negative is None and loaded.negative_captions(3) == (None, None)


def test_prompts_that_share_memory_are_saved(tmp_path):
    """The same CONDITIONING as positive and negative, and states that are views of one batch."""
    batch, masks = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    schedule = [(0, batch[0], masks[0]), (1, batch[1, :4], masks[1, :4])]
    save_caption_states(tmp_path / "s.safetensors", schedule, schedule)
    loaded = load_caption_states(tmp_path / "s.safetensors")
    assert_same(loaded.positive, schedule)
    assert_same(loaded.negative, schedule)


def test_captions_are_the_samplers(tmp_path):
    """The captions a file gives are scheduled_captions of its prompts: the special tokens for the positive
    prompts, none for the negative ones (as MAGI-1 Sampler builds them)."""
    tokens = builtin.tiny_special_tokens()
    width = tokens.hq.shape[0]
    positive = [(first, torch.randn(states.shape[0], width).to(states.dtype), mask) for first, states, mask in SCHEDULE]
    negative = [(0, torch.randn(5, width), torch.arange(5) < 4)]
    save_caption_states(tmp_path / "s.safetensors", positive, negative)
    loaded = load_caption_states(tmp_path / "s.safetensors")
    for got, want in zip(loaded.captions(6, tokens, length=12), scheduled_captions(positive, 6, tokens, length=12)):
        assert torch.equal(got, want)
    for got, want in zip(loaded.negative_captions(6, length=12), scheduled_captions(negative, 6, length=12)):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------ refusals
def good_tensors():
    states, mask = prompt(5, 3)
    return {"positive.first_chunks": torch.tensor([0]), "positive.0.states": states, "positive.0.mask": mask}


GOOD_METADATA = {"magi1_caption_states": "1", "positive_prompts": "1", "negative_prompts": "0"}


def changed(tensors=None, drop=(), **metadata):
    """A file's tensors and metadata: the good ones with some replaced (None: removed)."""
    t = {**good_tensors(), **(tensors or {})}
    m = {**GOOD_METADATA, **metadata}
    return {k: v for k, v in t.items() if k not in drop}, {k: v for k, v in m.items() if v is not None}


@pytest.mark.parametrize("tensors, metadata, problem", [
    (*changed(magi1_caption_states=None), "is not a valid caption-states file: no 'magi1_caption_states' metadata"),
    (*changed(magi1_caption_states="2"), "format version '2'; this pack reads version 1"),
    (*changed(positive_prompts="0"), "metadata 'positive_prompts' must be a whole number >= 1, got '0'"),
    (*changed(negative_prompts="x"), "metadata 'negative_prompts' must be a whole number, got 'x'"),
    (*changed(drop=("positive.0.mask",)), "missing tensor 'positive.0.mask'"),
    (*changed(positive_prompts="2"), "missing tensor 'positive.1.mask' (and 1 more)"),
    (*changed({"negative.0.states": torch.zeros(2, 16)}), "unexpected tensor 'negative.0.states'"),
    (*changed({"positive.0.mask": torch.ones(4, dtype=torch.bool)}),
     "'positive.0.mask' must be bool of shape (5,) like its states, got bool of shape (4,)"),
    (*changed({"positive.0.mask": torch.ones(5)}), "'positive.0.mask' must be bool of shape (5,) like its states, "
     "got float32 of shape (5,)"),
    (*changed({"positive.0.states": torch.zeros(5, 2, 8)}), "'positive.0.states' must be float32, float16 or "
     "bfloat16 of shape (tokens, width), got float32 of shape (5, 2, 8)"),
    (*changed({"positive.0.states": torch.zeros(5, 16, dtype=torch.float64)}), "got float64 of shape (5, 16)"),
    (*changed({"positive.first_chunks": torch.tensor([0], dtype=torch.int32)}),
     "'positive.first_chunks' must be int64 of shape (1,), got int32 of shape (1,)"),
    (*changed({"positive.first_chunks": torch.tensor([1])}), "'positive.first_chunks' must start at chunk 0 and "
     "increase, got [1]"),
    (*changed({"positive.first_chunks": torch.tensor([0, 0]), "positive.1.states": torch.zeros(2, 16),
               "positive.1.mask": torch.ones(2, dtype=torch.bool)}, positive_prompts="2"),
     "must start at chunk 0 and increase, got [0, 0]"),
    (*changed({"negative.first_chunks": torch.tensor([0]), "negative.0.states": torch.zeros(2, 8),
               "negative.0.mask": torch.ones(2, dtype=torch.bool)}, negative_prompts="1"),
     "the prompts' states differ in width [8, 16]"),
])
def test_malformed_files_are_refused_naming_file_and_problem(tmp_path, tensors, metadata, problem):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError) as refused:
        load_caption_states(path)
    assert str(refused.value).startswith(f"{path} is not a valid caption-states file: "), refused.value
    assert problem in str(refused.value)


def test_a_good_file_written_by_hand_loads(tmp_path):
    """The refusals above are of their one change: the file they start from is a caption-states file."""
    tensors, metadata = changed()
    save_file(tensors, tmp_path / "good.safetensors", metadata=metadata)
    assert load_caption_states(tmp_path / "good.safetensors").width == 16


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="caption states: no file at .*nothing.safetensors"):
        load_caption_states(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"junk.safetensors is not a caption-states file: not a readable .safetensors"):
        load_caption_states(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="vae.safetensors is not a valid caption-states file: no 'magi1_caption"):
        load_caption_states(builtin.VAE_FILE)  # a safetensors file of another kind


class _Trap:
    """Unpickling this creates a file: proof that a loader unpickled."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        return (open, (self.witness, "w"))


def test_a_pickle_is_never_unpickled(tmp_path):
    witness = tmp_path / "unpickled"
    path = tmp_path / "states.safetensors"
    path.write_bytes(pickle.dumps({"positive.0.states": _Trap(str(witness))}))
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_caption_states(path)
    torch.save({"x": _Trap(str(witness))}, path)  # torch's zip container, what a .pt holds
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_caption_states(path)
    assert not witness.exists()


def test_saving_refuses_what_would_not_load(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match="at least one positive prompt"):
        save_caption_states(path, [])
    with pytest.raises(ValueError, match=r"cannot be saved: 'positive.0.mask' must be bool of shape \(7,\)"):
        save_caption_states(path, [(0, torch.zeros(7, 16), torch.ones(6))])
    with pytest.raises(ValueError, match=r"cannot be saved: 'positive.first_chunks' must start at chunk 0"):
        save_caption_states(path, [(1, *prompt(3, 3))])
    with pytest.raises(ValueError, match=r"cannot be saved: 'negative.0.states' must be float32"):
        save_caption_states(path, SCHEDULE, [(0, torch.zeros(3, 16, dtype=torch.float64), torch.ones(3))])
    assert not path.exists()


# ------------------------------------------------------------------------------ MAGI-1 Save Caption States
def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
    """ComfyUI's folder_paths.get_save_image_path for plain prefixes: the next free counter in the folder."""
    subfolder, name = os.path.split(os.path.normpath(filename_prefix))
    folder = os.path.join(output_dir, subfolder)
    os.makedirs(folder, exist_ok=True)
    counter = 1 + sum(1 for f in os.listdir(folder) if f.startswith(name + "_"))
    return folder, name, counter, subfolder, filename_prefix


@pytest.fixture(scope="module")
def pack():
    with pack_namespace() as pack:
        yield pack


@pytest.fixture
def output_dir(pack, tmp_path, monkeypatch):
    folder_paths = pack.modules["caption_states"].folder_paths
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    monkeypatch.setattr(folder_paths, "get_save_image_path", get_save_image_path, raising=False)
    return tmp_path


def test_save_node_schema(pack):
    schema = pack.MAGI1SaveCaptionStates.GET_SCHEMA()
    assert (schema.node_id, schema.display_name, schema.category) == (
        "MAGI1SaveCaptionStates", "MAGI-1 Save Caption States", "MAGI-1")
    assert [(i.id, i.io_type, bool(i.options.get("optional"))) for i in schema.inputs] == [
        ("positive", "CONDITIONING", False), ("filename_prefix", "STRING", False), ("negative", "CONDITIONING", True)]
    assert schema.inputs[1].options["default"] == "magi1/caption_states"
    assert [out.io_type for out in schema.outputs] == ["STRING"] and schema.is_output_node


def test_save_node_writes_the_captions_the_sampler_builds(pack, output_dir):
    """A prompt schedule and a negative from MAGI-1 Tiny Text Encode, saved by the node and loaded: the same
    captions as MAGI-1 Sampler makes of the CONDITIONING itself."""
    encode = pack.MAGI1TinyTextEncode.execute
    positive = encode("0: a red ball moving right over a checkerboard\n1: a blue square standing still over a "
                      "gray wall\n3: a green triangle bouncing over a blue sky").result[0]
    negative = encode("a white ball spinning over a striped wall").result[0]
    path = pack.MAGI1SaveCaptionStates.execute(positive, "magi1/caption_states", negative).result[0]
    assert path == str(output_dir / "magi1" / "caption_states_00001_.safetensors") and os.path.isfile(path)
    loaded = load_caption_states(path)
    assert [first for first, _, _ in loaded.positive] == [0, 1, 3] and len(loaded.negative) == 1

    sampler = pack.modules["sampler"]
    tokens, width = builtin.tiny_special_tokens(), loaded.width
    want = scheduled_captions(sampler.conditioning_schedule(positive, "positive", width), 4, tokens, length=20)
    want_negative = scheduled_captions(sampler.conditioning_schedule(negative, "negative", width), 4, length=20)
    for got, expected in zip(loaded.captions(4, tokens, length=20) + loaded.negative_captions(4, length=20),
                             want + want_negative):
        assert torch.equal(got, expected)

    again = pack.MAGI1SaveCaptionStates.execute(positive, "magi1/caption_states").result[0]
    assert again.endswith("caption_states_00002_.safetensors") and load_caption_states(again).negative is None


def test_save_node_refuses_what_the_sampler_would(pack, output_dir):
    node = pack.MAGI1SaveCaptionStates
    positive = pack.MAGI1TinyTextEncode.execute("a red ball moving right over a checkerboard").result[0]
    with pytest.raises(ValueError, match="positive is empty; connect MAGI-1 Text Encode"):
        node.execute([], "x")
    with pytest.raises(ValueError, match="has no attention mask"):
        node.execute([[positive[0][0], {}]], "x")
    wide = [[torch.zeros(1, 3, 4096), {"attention_mask": torch.ones(1, 3)}]]
    with pytest.raises(ValueError, match="negative holds 4096-wide text states but positive 64-wide ones"):
        node.execute(positive, "x", wide)
    assert not any(output_dir.rglob("*.safetensors"))


def test_captions_method_matches_plain_dataclass_use():
    """CaptionStates made in memory (as the CLI makes it from --prompt) needs no file."""
    states = CaptionStates(tuple(SCHEDULE[:2]))
    caption, mask = states.captions(3, None, length=10)
    assert caption.shape == (3, 10, 16) and mask.shape == (3, 10)
    assert torch.equal(caption[2], scheduled_captions(SCHEDULE[:2], 3, None, length=10)[0][2])
