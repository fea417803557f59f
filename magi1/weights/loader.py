"""Build the DiT from a config, or load it from the official safetensors checkpoints (never pickles)."""

from __future__ import annotations

import json
import os
import re

import torch

from ..network.config import ModelConfig
from ..network.dit import MagiDiT, NullCaption, RotaryEmbedding, ZeroCenteredLayerNorm
from . import fp8, layer_sharding
from .safetensors_io import check_state_dict, file_kind, read_header, read_tensors, refuse_pickle
from .streaming import stream_layers

# The official example configs' model_config (example/{4.5B,24B}/*_config.json): a checkpoint whose
# tensors have one of these shapes gets the matching settings that tensors cannot show (x rescale,
# channel duplication, norm flavour).
OFFICIAL_MODEL_CONFIGS = {
    "4.5B": dict(num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24,
                 num_query_groups=8, kv_channels=128, layernorm_epsilon=1e-6, apply_layernorm_1p=True,
                 x_rescale_factor=1.0, half_channel_vae=False, params_dtype=torch.bfloat16, patch_size=2,
                 t_patch_size=1, in_channels=16, out_channels=16, cond_hidden_ratio=0.25, caption_channels=4096,
                 caption_max_length=800, xattn_cond_hidden_ratio=1.0, cond_gating_ratio=1.0,
                 gated_linear_unit=False),
}
OFFICIAL_MODEL_CONFIGS["24B"] = dict(
    OFFICIAL_MODEL_CONFIGS["4.5B"], num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48,
    x_rescale_factor=0.1, half_channel_vae=True, in_channels=32, out_channels=32, gated_linear_unit=True,
)
CONFIG_METADATA_KEY = "magi1_model_config"  # optional JSON model_config in a checkpoint's metadata
DISTILL_METADATA_KEY = "magi1_distill"  # optional "true" in a checkpoint's metadata


def build_dit(model_config, *, device=None, dtype=None, operations=None, weights=None):
    """The DiT for an official ``model_config`` (dict, whole config JSON dict, or ``ModelConfig``).

    ``dtype`` is the compute dtype of the transformer layers (default: the config's ``params_dtype``,
    else float32); the modules the official code promotes to float32 stay float32. ``operations``: the
    Linear / LayerNorm / Conv3d namespace (default ``magi1.network.ops.CastOps``); ``weights``: float8 storage of
    the layers' large weights (``magi1.network.dit.LayerFactory``). On ``device="meta"`` nothing is allocated.
    Weights are uninitialised: load them.
    """
    config = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(model_config)
    if dtype is None:
        dtype = config.params_dtype or torch.float32
    with torch.device(device if device is not None else "cpu"):
        return MagiDiT(config, dtype=dtype, operations=operations, weights=weights)


def load_dit(path, *, device=None, dtype=None, distill=None, weights="auto", operations=None, resident_layers=None,
             parallel=None):
    """Load an official MAGI-1 DiT checkpoint.

    ``path``: a ``model.safetensors.index.json``, any shard of a sharded checkpoint (its siblings are
    found through the index beside it), a single ``.safetensors`` file, or a folder holding one of those.
    The size (4.5B / 24B) comes from the tensors. Base and distill checkpoints hold identical tensors:
    ``distill`` defaults to whether the checkpoint's file or folder name says so (the official folders
    are ``*_distill`` / ``inference_weight.distill``) or the file is an official fp8 one. The model's
    ``variant`` and ``variant_reason`` say which it is and why (see ``model_description``); a built-in
    model's file (``magi1.builtin``) is named by its title, e.g. "MAGI-1 tiny demo (built-in)".

    ``weights``: how the transformer layers' large weights are kept: ``"auto"`` (as stored: high
    precision in ``dtype``, or the file's float8 kind), ``None`` (in ``dtype``), ``"fp8_e4m3fn"`` or
    ``"fp8_e4m3fn_scaled"`` (stored in float8 at load; see ``magi1.weights.fp8``). A float8 file (including the
    official ``*_distill_quant`` ones) always loads as the kind it stores. ``operations``: see
    ``build_dit``. ``resident_layers``: stream the layers through ``device`` (``magi1.stream_layers``):
    the weights load into host memory and only that many layers (plus two in flight) live on ``device``.
    ``parallel``: a ``magi1.Parallel``: this process reads only the transformer layers it owns and the
    model is shared with the others (``magi1.weights.layer_sharding.distribute``); ``device`` defaults to its device.

    Tensors are read one at a time straight into the model built on the meta device (no second
    copy), in float32 for the modules the official code promotes and in ``dtype`` for the rest
    (default: bfloat16 on CUDA, float32 elsewhere).
    """
    files, shapes, dtypes, metadata = checkpoint_header(path)
    ignored = fp8.ignored_keys(shapes)
    shapes = fp8.model_shapes(shapes)
    stored = fp8.stored_kind(shapes, dtypes)
    kind = stored if stored is not None or weights == "auto" else weights
    config, size = infer_config(shapes, metadata, dtypes)
    if device is None and parallel is not None:
        device = parallel.device
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compute_device, device = device, (torch.device("cpu") if resident_layers is not None else device)

    model = build_dit(config, device="meta", dtype=dtype, operations=operations, weights=kind)
    targets = dict(model.state_dict(keep_vars=True))
    expected = dict(shapes)
    if kind == "fp8_e4m3fn_scaled" and stored is None:  # the scales are made at load
        expected.update({k: tuple(v.shape) for k, v in targets.items() if k.endswith(".scale_weight")})
    check_state_dict(model, expected)
    convert = fp8.converter(targets, kind)
    other_layers = _other_layers(config, parallel, resident_layers)
    skip = set(ignored) | {k for k in shapes if other_layers and k.startswith(other_layers)}
    _read_into(model, files, device, convert, skip, other_layers)
    model.eval().requires_grad_(False)
    _name(model, files, size, kind, *_distill(distill, files, stored, metadata))
    if resident_layers is not None:
        stream_layers(model, compute_device, resident_layers)  # kept as model._layer_streamer
    return layer_sharding.distribute(model, parallel)


def _name(model, files, size, kind, distill, why):
    """Set the loaded model's ``distill``, ``variant`` (e.g. "4.5B_distill"), ``variant_reason`` (why base or
    distill) and ``builtin`` (a ``magi1.builtin`` model's name, else None): a built-in model's file is named by
    its title, as the loaders list it, not as a "custom_distill" checkpoint."""
    from ..builtin import builtin_at  # here: magi1.builtin imports this module

    builtin = builtin_at(files[0]) if len(files) == 1 else None
    model.distill, model.builtin = distill, None if builtin is None else builtin.name
    if builtin is None:
        model.variant = f"{size or 'custom'}_{'distill' if distill else 'base'}" + ("_fp8" if kind else "")
        model.variant_reason = why
    else:
        model.variant = builtin.title
        model.variant_reason = "distilled" if distill else "run as a base model (as chosen)"


def model_description(model):
    """How the reports name a loaded DiT: ``4.5B_distill (why it is taken as distilled)``, or a built-in
    model by its name (``MAGI-1 tiny demo (built-in), distilled``)."""
    if getattr(model, "builtin", None):
        return f"{model.variant}, {model.variant_reason}"
    return f"{model.variant} ({model.variant_reason})"


def _other_layers(config, parallel, resident_layers):
    """The key prefixes of the transformer layers other processes own (this one does not read them)."""
    if parallel is None or parallel.cp == 1 or not parallel.shard_weights:
        return ()
    if resident_layers is not None:
        raise ValueError("resident_layers (streaming) and parallel cannot be combined: the processes already split "
                         "the layers")
    mine = set(layer_sharding.owned_layers(config.num_layers, parallel))
    return tuple(layer_sharding.layer_prefix(i) for i in range(config.num_layers) if i not in mine)


def _read_into(model, files, device, convert, skip, other_layers):
    """Every tensor of ``files`` but those in ``skip`` (ignored ones, other processes' layers), into the
    meta-built model."""
    for file in files:
        part = read_tensors(file, device, None, convert=convert, skip=skip)
        model.load_state_dict(part, strict=False, assign=True)
        del part
    still_meta = [k for k, v in model.state_dict().items()
                  if v.is_meta and not (other_layers and k.startswith(other_layers))]
    if still_meta:  # check_state_dict guarantees every key is in the files; this guards the assignment
        raise RuntimeError(f"DiT tensors left unloaded: {still_meta[:5]}")


def _distill(asked, files, stored, metadata):
    """``(distill, why)``: as asked, else from the checkpoint's own folder and file names and metadata
    (the official layout is ``<size>_distill/inference_weight.distill/model-*.safetensors``), never from
    folders further up (a base checkpoint under a folder named "distill" is still base)."""
    if asked is not None:
        return bool(asked), "as chosen"
    folder, name = os.path.split(os.path.abspath(files[0]))
    own = f"{os.path.basename(folder)}/{name}"  # the file and its own folder, never further up
    if "distill" in own.lower():
        return True, f"the checkpoint's name {own!r} says distill"
    if stored == "fp8_official":
        return True, "the official fp8 checkpoints are distilled"
    if metadata.get(DISTILL_METADATA_KEY) == "true":
        return True, f"its metadata says {DISTILL_METADATA_KEY}"
    return False, f"neither the checkpoint's name {own!r} nor its metadata says distill"


def checkpoint_header(path):
    """``(files, shapes, dtypes, metadata)`` of the checkpoint at ``path``, read from its files' headers (no
    tensor is read), every shard's merged."""
    files = checkpoint_files(path)
    shapes, dtypes, metadata = {}, {}, {}
    for file in files:
        for whole, part in zip((shapes, dtypes, metadata), read_header(file)):
            whole.update(part)
    return files, shapes, dtypes, metadata


def checkpoint_summary(path, distill=None):
    """``(ModelConfig, distilled, why)`` of the checkpoint at ``path`` as ``load_dit`` would take it, from its
    headers alone (for checks and estimates before loading)."""
    files, shapes, dtypes, metadata = checkpoint_header(path)
    shapes = fp8.model_shapes(shapes)
    distilled, why = _distill(distill, files, fp8.stored_kind(shapes, dtypes), metadata)
    return infer_config(shapes, metadata, dtypes)[0], distilled, why


def checkpoint_files(path):
    """The safetensors files of the checkpoint at ``path`` (see ``load_dit``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no MAGI-1 checkpoint at {path}")
    refuse_pickle(path)
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        singles = [n for n in names if n.endswith(".safetensors")]
        if len(indexes) == 1:
            return checkpoint_files(os.path.join(path, indexes[0]))
        if not indexes and len(singles) == 1:
            return [os.path.join(path, singles[0])]
        raise ValueError(f"{path} holds {len(indexes)} index files and {len(singles)} .safetensors files; "
                         "pass the model.safetensors.index.json (sharded) or the .safetensors file itself")
    if path.endswith(".json"):
        return _shards_of_index(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{os.path.basename(path)}: expected a .safetensors file or a .safetensors.index.json")
    folder, name = os.path.split(os.path.abspath(path))
    for index in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors.index.json")):
        shards = _shards_of_index(os.path.join(folder, index))
        if os.path.join(folder, name) in shards:
            return shards
    return _unindexed_shards(path) or [os.path.abspath(path)]


SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d+)-of-(?P<total>\d+)\.safetensors$")  # Hugging Face's


def checkpoint_entries(names, folder_of):
    """One entry per checkpoint among ``names`` (the ``.safetensors`` files of a model folder as ComfyUI lists
    them, relative, with ``/`` or on Windows ``\\`` between folders), for a dropdown: a sharded checkpoint
    once, by its ``.safetensors.index.json`` (found beside its shards; ``folder_of(name)`` gives the folder a
    listed file is in), or by its first shard when it has no index; every other file as itself. Returns
    ``(entries, set_of)``: the sorted entries, and each hidden shard's entry (so that a shard chosen before
    stays loadable)."""
    by_folder = {}
    for name in names:
        if name.endswith(".safetensors"):
            by_folder.setdefault(same_path(_split(name)[0]), []).append(name)
    entries, set_of = [], {}
    for files in by_folder.values():
        grouped = set()
        prefix, folder = _split(files[0])[0], folder_of(files[0])
        for index in _index_files(folder):
            try:
                shards = _listed_shards(os.path.join(folder, index))
            except (OSError, ValueError):
                continue  # a damaged index is not offered; its shards stay listed as files
            members = [name for name in files if _split(name)[1] in shards]
            entries.append(prefix + index)
            set_of.update((name, prefix + index) for name in members)
            grouped.update(members)
        unindexed = {}
        for name in files:
            match = SHARD_NAME.match(_split(name)[1])
            if name not in grouped and match:
                unindexed.setdefault((match["stem"], match["total"]), []).append(name)
        for members in unindexed.values():
            members.sort()
            if len(members) > 1:
                entries.append(members[0])
                set_of.update((name, members[0]) for name in members[1:])
                grouped.update(members)
        entries += [name for name in files if name not in grouped]
    return sorted(entries), set_of


def same_path(name):
    """A listed name with ``/`` between folders, whatever the system wrote (to compare names)."""
    return name.replace("\\", "/")


def _split(name):
    """``(folder part with its trailing separator, file name)`` of a listed name."""
    cut = max(name.rfind("/"), name.rfind("\\")) + 1
    return name[:cut], name[cut:]


_LISTED_SHARDS = {}  # index path -> ((mtime, size), shard names): dropdowns are rebuilt at every queued prompt


def _listed_shards(index_path):
    """The file names of the shards an index lists (read again only when the index changes)."""
    stat = os.stat(index_path)
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _LISTED_SHARDS.get(index_path)
    if cached is None or cached[0] != stamp:
        cached = (stamp, frozenset(os.path.basename(shard) for shard in _shards_of_index(index_path)))
        _LISTED_SHARDS[index_path] = cached
    return cached[1]


def _index_files(folder):
    try:
        return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors.index.json"))
    except OSError:
        return []


def _unindexed_shards(path):
    """The whole set of a Hugging Face-named shard without an index (``model-00001-of-00002.safetensors``:
    every number up to the total, beside it), or None when the name is not a shard's."""
    folder, name = os.path.split(os.path.abspath(path))
    match = SHARD_NAME.match(name)
    if match is None or int(match["total"]) < 2:
        return None
    width, total = len(match["number"]), int(match["total"])
    shards = [os.path.join(folder, f"{match['stem']}-{i:0{width}d}-of-{match['total']}.safetensors")
              for i in range(1, total + 1)]
    missing = [os.path.basename(s) for s in shards if not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"{name} is one of {total} shards, but {missing} are not beside it in {folder}: "
                                "download the missing shards")
    return shards


def _shards_of_index(index_path):
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index_path} is not valid JSON ({error}); the download is probably incomplete or "
                         "damaged: download the index file again") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} is not a safetensors index (no weight_map)")
    folder = os.path.dirname(os.path.abspath(index_path))
    shards = [_shard_inside(folder, name, index_path) for name in sorted(set(map(str, weight_map.values())))]
    missing = [os.path.basename(s) for s in shards if not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"{os.path.basename(index_path)} lists shards that are not in {folder}: {missing}")
    return shards


def _shard_inside(folder, name, index_path):
    """A shard named by an index, which must be a plain file name in the index's own folder (the name is
    checked, not where a symlink points: Hugging Face caches link every file to a blob elsewhere)."""
    if os.path.isabs(name) or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"{index_path} names a shard outside its folder ({name!r}); shards must sit beside the "
                         "index: the index file is damaged or not an official one")
    return os.path.join(folder, name)


def infer_config(shapes, metadata=None, dtypes=None):
    """``(ModelConfig, size)`` of a checkpoint from its tensor shapes; ``size`` is "4.5B", "24B" or None.

    A checkpoint that carries its ``model_config`` as JSON in the safetensors metadata (key
    ``magi1_model_config``, as the pack's own tiny model does) is taken at its word.
    """
    metadata = metadata or {}
    if CONFIG_METADATA_KEY in metadata:
        return ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY])), None
    required = ("x_embedder.weight", "final_linear.linear.weight", "y_embedder.null_caption_embedding",
                "videodit_blocks.layers.0.self_attention.linear_qkv.q.weight",
                "videodit_blocks.layers.0.self_attention.linear_qkv.k.weight",
                "videodit_blocks.layers.0.self_attention.q_layernorm.weight",
                "videodit_blocks.layers.0.mlp.linear_fc1.weight", "videodit_blocks.layers.0.mlp.linear_fc2.weight",
                "t_embedder.mlp.0.weight")
    absent = [k for k in required if k not in shapes]
    if absent:
        sample = sorted(shapes)[:5]
        kind = file_kind(shapes)
        if kind is not None and not kind.startswith("a MAGI-1 DiT"):
            raise ValueError(f"not a MAGI-1 DiT checkpoint: this file is {kind}")
        raise ValueError(f"not a MAGI-1 DiT checkpoint: {len(absent)} of its defining tensors are missing "
                         f"(first: {absent[:5]}); the file's {len(shapes)} tensors start with {sample}")
    hidden, in_channels, t_patch, patch, _ = shapes["x_embedder.weight"]
    head_dim = shapes["videodit_blocks.layers.0.self_attention.q_layernorm.weight"][0]
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"videodit_blocks\.layers\.(\d+)\.", k))}
    ffn = shapes["videodit_blocks.layers.0.mlp.linear_fc2.weight"][1]
    fc1 = shapes["videodit_blocks.layers.0.mlp.linear_fc1.weight"][0]
    caption_length, caption_channels = shapes["y_embedder.null_caption_embedding"]
    values = dict(
        num_layers=max(layer_ids) + 1, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=shapes["videodit_blocks.layers.0.self_attention.linear_qkv.q.weight"][0] // head_dim,
        num_query_groups=shapes["videodit_blocks.layers.0.self_attention.linear_qkv.k.weight"][0] // head_dim,
        kv_channels=head_dim, patch_size=patch, t_patch_size=t_patch, in_channels=in_channels,
        out_channels=shapes["final_linear.linear.weight"][0] // (t_patch * patch * patch),
        cond_hidden_ratio=shapes["t_embedder.mlp.0.weight"][0] / hidden,
        caption_channels=caption_channels, caption_max_length=caption_length, gated_linear_unit=fc1 == 2 * ffn,
    )
    for size, official in OFFICIAL_MODEL_CONFIGS.items():
        if all(official[k] == v for k, v in values.items()):
            return ModelConfig(**official), size
    # Not an official size: official defaults for what tensors cannot show; the file's storage dtype.
    stored = (dtypes or {}).get("videodit_blocks.layers.0.self_attention.linear_qkv.q.weight", "BF16")
    values.update(layernorm_epsilon=1e-6, apply_layernorm_1p=True,
                  params_dtype={"F32": torch.float32, "F16": torch.float16}.get(stored, torch.bfloat16))
    return ModelConfig(**values), None


def random_dit(model_config, *, seed=0, device=None, dtype=None, draw_device="cpu", weights=None, operations=None):
    """A DiT with random weights of sensible scale (for tests, benchmarks and training from scratch):
    matrices ~ N(0, 1/fan_in), biases ~ 0.1 N(0, 1), norm scales ~ 1 + 0.1 N(0, 1), the null caption
    ~ N(0, 1), RoPE bands = defaults * (1 + 0.1 N(0, 1)). Drawn on the CPU by default, so a seed gives
    the same weights on every device; ``draw_device="cuda"`` draws billions of them in seconds instead
    (other values, for benchmarks). ``weights`` ``"fp8_e4m3fn"`` / ``"fp8_e4m3fn_scaled"``: the same
    values stored in float8 as ``load_dit`` would store them; ``"fp8_official"``: in the official fp8
    layout (``magi1.weights.fp8.official_layout``)."""
    model = build_dit(model_config, device="meta", dtype=dtype)
    values = _random_values(model, seed, device, draw_device)
    if weights is not None:
        model = build_dit(model_config, device="meta", dtype=dtype, weights=weights, operations=operations)
        values = fp8.official_layout(model, values) if weights == "fp8_official" else _converted(model, values, weights)
    elif operations is not None:
        model = build_dit(model_config, device="meta", dtype=dtype, operations=operations)
    model.load_state_dict(values, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _converted(model, values, kind):
    """``values`` (by parameter name) stored as ``model``, built for float8 ``kind``, holds them."""
    convert = fp8.converter(dict(model.named_parameters()), kind)
    out = {}
    for key, value in values.items():
        out.update(convert(key, value))
    return out


def _random_values(model, seed, device, draw_device):
    """The random values of ``random_dit``, by parameter name."""
    generator = torch.Generator(device=draw_device).manual_seed(int(seed))
    device = torch.device(device) if device is not None else torch.device("cpu")
    modules = dict(model.named_modules())
    values = {}
    for name, param in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        noise = torch.randn(param.shape, generator=generator, device=draw_device)
        if isinstance(module, RotaryEmbedding):
            dim = model.config.hidden_size // model.config.num_attention_heads
            value = RotaryEmbedding.default_bands(dim).to(noise.device) * (1 + 0.1 * noise)
        elif isinstance(module, (torch.nn.LayerNorm, ZeroCenteredLayerNorm)):
            one = leaf == "weight" and not getattr(module, "one_plus", False)
            value = float(one) + 0.1 * noise
        elif leaf == "bias":
            value = 0.1 * noise
        elif isinstance(module, NullCaption):
            value = noise
        else:
            value = noise / param[0].numel() ** 0.5
        values[name] = value.to(device=device, dtype=param.dtype)
    return values
