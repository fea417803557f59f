"""The node schemas without ComfyUI (CI has none): ids unique and prefixed, defaults inside their ranges
and options, every input and output documented. ComfyUI's modules are replaced by small recorders of
what the nodes declare; tests/test_comfyui.py checks the same nodes against the real API."""

import pytest

from comfy_stubs import pack_nodes


@pytest.fixture(scope="module")
def nodes():
    with pack_nodes() as node_list:
        yield node_list


def test_ids_are_unique_prefixed_and_categorised(nodes):
    schemas = [node.GET_SCHEMA() for node in nodes]
    ids = [schema.node_id for schema in schemas]
    assert len(ids) == len(set(ids)) == 11
    for schema in schemas:
        assert schema.node_id.startswith("MAGI1") and schema.category == "MAGI-1"
        assert schema.display_name.startswith("MAGI-1 ") and schema.description


def test_inputs_and_outputs_are_documented_and_defaults_valid(nodes):
    for node in nodes:
        schema = node.GET_SCHEMA()
        names = [inp.id for inp in schema.inputs]
        assert len(names) == len(set(names)), schema.node_id
        for inp in schema.inputs:
            where = f"{schema.node_id}.{inp.id}"
            assert len(inp.options.get("tooltip", "")) > 20, where
            default = inp.options.get("default")
            if "options" in inp.options and default is not None:
                assert default in inp.options["options"], where
            if default is not None and "min" in inp.options:
                assert inp.options["min"] <= default <= inp.options["max"], where
                step = inp.options.get("step")
                if inp.kind == "Int" and step:
                    assert (default - inp.options["min"]) % step == 0, where
        for out in schema.outputs:
            assert out.options.get("tooltip"), schema.node_id
        # execute takes exactly the declared inputs
        code = node.execute.__func__.__code__
        assert list(code.co_varnames[1:code.co_argcount]) == names, schema.node_id
        # required inputs first: ComfyUI orders sockets and widgets required-then-optional, so the schema's
        # order is the order of the widget values in saved workflows
        optional = [bool(inp.options.get("optional")) for inp in schema.inputs]
        assert optional == sorted(optional), schema.node_id


def test_loaders_list_a_sharded_checkpoint_once(nodes):
    # The stand-in folder lists two shards of one checkpoint without an index (and a pickle): one entry.
    loader = next(node for node in nodes if node.__name__ == "MAGI1DiTLoader").GET_SCHEMA()
    checkpoint = next(inp for inp in loader.inputs if inp.id == "checkpoint")
    assert checkpoint.options["options"] == ["MAGI-1 tiny demo (built-in)", "MAGI-1 benchmark model (built-in, 128x128)",
                                             "magi/model-00001-of-00002.safetensors"]


def test_sampler_defaults_are_a_valid_request(nodes):
    from magi1 import VideoLayout

    sampler = next(node for node in nodes if node.__name__ == "MAGI1Sampler").GET_SCHEMA()
    defaults = {inp.id: inp.options.get("default") for inp in sampler.inputs}
    layout = VideoLayout.plan(defaults["frames"], defaults["height"], defaults["width"])
    assert layout.chunk_num == 4  # 96 frames at 720x720: four chunks of 24 frames
    optional = {inp.id for inp in sampler.inputs if inp.options.get("optional")}
    assert optional == {"negative", "prefix_latent", "record_masks", "kv_offload", "preview_vae", "token_block"}  # 0.2.0: no vae
    # Every input is checked at queue time (nodes/queue_checks.py): ComfyUI's ranges, then the node's own rules.
    node = next(node for node in nodes if node.__name__ == "MAGI1Sampler")
    values = dict(width=720, height=720, frames=96, steps=16, seed=0, guidance=7.5)
    assert node.validate_inputs(**values) is True
    assert "nearest valid value is 8" in node.validate_inputs(**{**values, "steps": 6})
    assert "width must be a multiple of 16; the nearest valid value is 80" in node.validate_inputs(
        **{**values, "width": 72})
    assert "between 16 and 4096, got 5000" in node.validate_inputs(**{**values, "height": 5000})
    assert "between 4 and 1000, got 0" in node.validate_inputs(**{**values, "steps": 0})
    assert node.validate_inputs(width=None, height=None, steps=None) is True  # linked: checked at execution


def test_encode_prefix_takes_the_vae_and_one_of_two_image_inputs(nodes):
    encode = next(node for node in nodes if node.__name__ == "MAGI1EncodePrefix")
    schema = encode.GET_SCHEMA()
    inputs = {inp.id: inp for inp in schema.inputs}
    assert [(i.id, i.io_type, bool(i.options.get("optional"))) for i in schema.inputs] == [
        ("vae", "MAGI1_VAE", False), ("width", "INT", False), ("height", "INT", False),
        ("start_image", "IMAGE", True), ("prefix_video", "IMAGE", True)]
    assert [(out.io_type, out.options.get("display_name")) for out in schema.outputs] == [("LATENT", "prefix_latent")]
    sampler = {inp.id: inp for inp in next(n for n in nodes if n.__name__ == "MAGI1Sampler").GET_SCHEMA().inputs}
    for size in ("width", "height"):  # the same widget as the sampler's, which it must equal
        assert inputs[size].options == sampler[size].options | {"tooltip": inputs[size].options["tooltip"]}
    assert encode.validate_inputs(vae=None, width=64, height=64, start_image=None) is True
    assert "multiple of 16" in encode.validate_inputs(vae=None, width=60, height=64, start_image=None)


def test_vae_nodes_share_a_file(nodes):
    modules = {node.__name__: node.__module__.rsplit(".", 1)[1] for node in nodes}
    assert modules["MAGI1EncodePrefix"] == modules["MAGI1Decode"] == "vae"
