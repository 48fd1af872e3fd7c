"""How vLLM KV-cache tensors map onto kvloft's LayerMemory (``kvloft.vllm.layout``) and the
engine's namespace (``kvloft.vllm.identity``), without vLLM or torch: tensors are described by
their shape and strides."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import TEST_LAYERS, make_namespace

import kvloft
from kvloft import HostKVCache, LayerMemory
from kvloft.vllm.identity import attention_layout, engine_namespace, model_identity
from kvloft.vllm.layout import LayoutError, TensorGeometry, block_shape, describe

BASE = 0x7F00_0000_0000


def dense(shape: tuple[int, ...], element_size: int = 2, data_ptr: int = BASE) -> TensorGeometry:
    """A contiguous (C-order) tensor."""
    stride = []
    acc = 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return TensorGeometry(tuple(shape), tuple(reversed(stride)), element_size, data_ptr)


def block_addresses(mem: LayerMemory, block: int) -> list[tuple[int, int]]:
    """(address, bytes) of every segment of ``block``."""
    return [
        (mem.base + block * mem.block_stride + s * mem.segment_stride, mem.segment_bytes) for s in range(mem.segments)
    ]


def element_addresses(g: TensorGeometry, block_axis: int, per_block: int, block: int) -> set[int]:
    """Byte addresses of every element of engine block ``block`` (brute force over the tensor)."""
    out: set[int] = set()
    for index in _indices(g.shape):
        if index[block_axis] // per_block != block:
            continue
        offset = sum(i * s for i, s in zip(index, g.stride)) * g.element_size
        out.update(range(g.data_ptr + offset, g.data_ptr + offset + g.element_size))
    return out


def _indices(shape: tuple[int, ...]):
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _indices(shape[1:]):
            yield (i, *rest)


def covered(mem: LayerMemory, block: int) -> set[int]:
    out: set[int] = set()
    for addr, n in block_addresses(mem, block):
        out.update(range(addr, addr + n))
    return out


# ---------------------------------------------------------------------------------------
# describe()
# ---------------------------------------------------------------------------------------


def test_block_outermost_cache() -> None:
    # vLLM's CPU cache: [num_blocks, heads, block_size, 2 * head_size], bf16.
    nb, h, n, d = 10, 4, 16, 8
    g = dense((nb, h, n, 2 * d))
    mem = describe(g, nb)
    block = h * n * 2 * d * 2
    assert mem == LayerMemory(
        base=BASE, num_blocks=nb, block_stride=block, segments=1, segment_stride=0, segment_bytes=block
    )
    assert block_shape(g, nb) == f"[{h},{n},{2 * d}]"


def test_kv_first_cache_has_two_segments() -> None:
    # [2, num_blocks, block_size, heads, head_size]: K of every block, then V of every block.
    nb, n, h, d = 10, 16, 4, 8
    g = dense((2, nb, n, h, d), element_size=2)
    mem = describe(g, nb)
    block = n * h * d * 2
    assert mem == LayerMemory(
        base=BASE, num_blocks=nb, block_stride=block, segments=2, segment_stride=nb * block, segment_bytes=block
    )
    assert block_shape(g, nb) == f"2x[{n},{h},{d}]"


def test_every_described_byte_belongs_to_its_block() -> None:
    """Brute force over small tensors: a block's segments cover exactly its elements."""
    cases = [
        (dense((5, 2, 4, 6)), 5, 0, 1),
        (dense((2, 5, 4, 2, 3)), 5, 1, 1),
        (dense((10, 2, 2, 6)), 5, 0, 2),  # kernel blocks split in two
        (dense((2, 15, 2, 2, 3)), 5, 1, 3),
    ]
    for g, nb, axis, per_block in cases:
        mem = describe(g, nb)
        for b in range(nb):
            assert covered(mem, b) == element_addresses(g, axis, per_block, b), (g, b)


def test_host_kv_cache_layers_are_described_like_the_cache_describes_itself() -> None:
    with HostKVCache(num_layers=3, num_blocks=12, block_bytes=256) as cache:
        for i, layer in enumerate(cache.layers()):
            g = TensorGeometry((2, 12, 256), (12 * 256, 256, 1), 1, cache.address(i))
            assert describe(g, 12) == layer
            # The same bytes seen as [2, num_blocks, 64] float32.
            assert describe(TensorGeometry((2, 12, 64), (12 * 64, 64, 1), 4, cache.address(i)), 12) == layer


def test_kernel_blocks_split_are_folded() -> None:
    nb = 8
    # Block-outermost, each engine block as 2 adjacent kernel blocks of 8 tokens.
    whole = describe(dense((nb, 4, 16, 16)), nb)
    g = dense((2 * nb, 4, 8, 16))
    split = describe(g, nb)
    assert split == whole
    assert split.segments == 1 and split.segment_bytes == split.block_stride == 4 * 16 * 16 * 2
    assert block_shape(g, nb) == "[4,8,16]x2"
    # K/V-first with 4 kernel blocks per engine block.
    g = dense((2, 4 * nb, 4, 2, 8))
    mem = describe(g, nb)
    kernel = 4 * 2 * 8 * 2
    assert mem == LayerMemory(
        base=BASE,
        num_blocks=nb,
        block_stride=4 * kernel,
        segments=2,
        segment_stride=4 * nb * kernel,
        segment_bytes=4 * kernel,
    )
    assert mem == describe(dense((2, nb, 16, 2, 8)), nb)
    assert block_shape(g, nb) == "2x[4,2,8]x4"


def test_non_adjacent_kernel_blocks_are_refused() -> None:
    nb = 4
    # Kernel blocks padded to 2x their size: the two halves of a block are not one run.
    g = TensorGeometry((2 * nb, 4, 8), (64, 8, 1), 2, BASE)
    with pytest.raises(LayoutError, match="not adjacent"):
        describe(g, nb)


def test_padded_blocks_keep_their_stride() -> None:
    # One kernel block per engine block, rows padded: block_stride > segment_bytes is fine.
    g = TensorGeometry((6, 4, 8), (64, 8, 1), 2, BASE)
    assert describe(g, 6) == LayerMemory(
        base=BASE, num_blocks=6, block_stride=128, segments=1, segment_stride=0, segment_bytes=64
    )


def test_layer_view_of_a_cross_layer_cache() -> None:
    # [num_blocks, layers, heads, block, channels]; layer 2's view starts 2 layers in and its
    # block stride spans every layer.
    nb, layers, h, n, c = 6, 3, 2, 4, 8
    full = dense((nb, layers, h, n, c), element_size=2)
    per_layer = h * n * c * 2
    view = TensorGeometry(
        (nb, h, n, c), (full.stride[0], *full.stride[2:]), 2, BASE + 2 * full.stride[1] * 2
    )
    assert describe(view, nb) == LayerMemory(
        base=BASE + 2 * per_layer,
        num_blocks=nb,
        block_stride=layers * per_layer,
        segments=1,
        segment_stride=0,
        segment_bytes=per_layer,
    )


def test_size_one_axes_ignore_their_strides() -> None:
    g = TensorGeometry((5, 1, 4, 8), (32, 12345, 8, 1), 2, BASE)
    assert describe(g, 5).segment_bytes == 64


def test_mla_cache() -> None:
    g = dense((9, 16, 576), element_size=2)
    mem = describe(g, 9)
    assert (mem.segments, mem.segment_bytes, mem.block_stride) == (1, 16 * 576 * 2, 16 * 576 * 2)
    assert block_shape(g, 9) == "[16,576]"


@pytest.mark.parametrize(
    "g",
    [
        # A slice of the last axis: each row is followed by a gap.
        TensorGeometry((10, 4, 16, 8), (1024, 256, 16, 1), 2, BASE),
        # A transposed inner view (HND storage seen as NHD).
        TensorGeometry((10, 16, 4, 8), (512, 8, 128, 1), 2, BASE),
        # K/V-first with a non-dense block.
        TensorGeometry((2, 10, 16, 8), (10 * 16 * 16, 16 * 16, 16, 2), 2, BASE),
    ],
)
def test_non_dense_block_is_refused(g: TensorGeometry) -> None:
    with pytest.raises(LayoutError, match="not one dense run"):
        describe(g, 10)


@pytest.mark.parametrize(
    ("shape", "num_blocks"),
    [
        ((7, 3, 16), 5),  # no axis divisible by the block count
        ((3, 5, 16), 5),  # blocks on axis 1 but axis 0 is not K/V
        ((4, 8), 16),  # fewer rows than blocks
    ],
)
def test_no_block_axis_is_refused(shape: tuple[int, ...], num_blocks: int) -> None:
    with pytest.raises(LayoutError, match="no leading axis") as e:
        describe(dense(shape), num_blocks)
    assert str(list(shape)) in str(e.value)


def test_zero_blocks_is_refused() -> None:
    with pytest.raises(LayoutError):
        describe(dense((4, 8)), 0)


def test_layout_error_is_a_value_error() -> None:
    assert issubclass(LayoutError, ValueError)


# ---------------------------------------------------------------------------------------
# identity: attention_layout, model_identity, engine_namespace
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "use_mla", "expected"),
    [
        ("LBHNC", False, "hnd"),
        ("LBNHC", False, "nhd"),
        ("LHBNC", False, "hnd"),
        ("BLHNC", False, "cross_layer"),
        ("BLNHC", False, "cross_layer"),
        ("BHLNC", False, "cross_layer"),
        ("lbhnc", False, "hnd"),
        (None, False, "nhd"),
        # vLLM's legacy names, accepted as aliases of LBNHC / LBHNC.
        ("NHD", False, "nhd"),
        ("HND", False, "hnd"),
        ("LBHNC", True, "mla"),
        ("BLHNC", True, "mla"),
        (None, True, "mla"),
    ],
)
def test_attention_layout(name: str | None, use_mla: bool, expected: str) -> None:
    assert attention_layout(name, use_mla) == expected
    assert expected in kvloft.namespace.LAYOUTS


def test_model_identity_of_a_hub_name() -> None:
    assert model_identity("org/model", "abc123") == "org/model@abc123"
    assert model_identity("org/model", None) == "org/model@"
    assert model_identity("org/model", "abc123") != model_identity("org/model", "abc124")


def test_model_identity_of_a_long_name_is_bounded() -> None:
    long = "org/" + "m" * 400
    ident = model_identity(long, "rev")
    assert len(ident.encode()) <= 256
    assert ident != model_identity(long + "x", "rev")
    assert ident == model_identity(long, "rev")


def test_model_identity_of_a_local_directory(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (model / "model.safetensors").write_bytes(b"x" * 100)
    first = model_identity(str(model), None)
    assert first == model_identity(str(model), None) == model_identity(str(model), "ignored-revision")
    assert first.startswith(os.path.abspath(model) + "#")
    # A relative path to the same directory is the same model.
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert model_identity("model", None) == first
    finally:
        os.chdir(cwd)

    (model / "config.json").write_text(json.dumps({"hidden_size": 128}))
    second = model_identity(str(model), None)
    assert second != first and second == model_identity(str(model), None)

    (model / "model.safetensors").write_bytes(b"x" * 101)  # rebuilt weights
    third = model_identity(str(model), None)
    assert third not in (first, second)

    (model / "README.md").write_text("notes")  # not a weight file: no change
    assert model_identity(str(model), None) == third


def _fake_vllm_config(model: str, **changes: object) -> SimpleNamespace:
    mc = dict(model=model, revision="r1", dtype="torch.bfloat16", quantization=None, use_mla=False,
              num_kv_heads=8, head_size=64)
    cc = dict(block_size=16, cache_dtype="auto", prefix_caching_hash_algo="sha256", kv_cache_layout="LBHNC")
    pc = dict(tensor_parallel_size=2, pipeline_parallel_size=1)
    for key, value in changes.items():
        section, name = key.split("__")
        {"mc": mc, "cc": cc, "pc": pc}[section][name] = value
    heads, head_size = mc.pop("num_kv_heads"), mc.pop("head_size")
    model_config = SimpleNamespace(**mc, get_total_num_kv_heads=lambda: heads, get_head_size=lambda: head_size)
    return SimpleNamespace(
        model_config=model_config, cache_config=SimpleNamespace(**cc), parallel_config=SimpleNamespace(**pc)
    )


def test_engine_namespace_from_a_config() -> None:
    config = _fake_vllm_config("org/model")
    ns = engine_namespace(config, 28, "[8,16,128]", "cpu")
    assert isinstance(ns, kvloft.Namespace)
    assert ns == kvloft.Namespace(
        model="org/model@r1",
        dtype="bfloat16",
        kv_dtype="auto",
        num_layers=28,
        num_kv_heads=8,
        head_size=64,
        block_size=16,
        layout="hnd",
        tp_size=2,
        pp_size=1,
        group=0,
        variant="vllm/cpu/LBHNC/[8,16,128]/hash=sha256",
    )
    assert kvloft.Namespace.from_wire(ns.to_wire()) == ns
    assert engine_namespace(_fake_vllm_config("org/model"), 28, "[8,16,128]", "cpu") == ns


@pytest.mark.parametrize(
    ("change", "field", "value"),
    [
        ({"mc__revision": "r2"}, "model", "org/model@r2"),
        ({"mc__dtype": "torch.float16"}, "dtype", "float16"),
        ({"mc__dtype": "float32"}, "dtype", "float32"),
        ({"mc__num_kv_heads": 4}, "num_kv_heads", 4),
        ({"mc__head_size": 128}, "head_size", 128),
        ({"mc__use_mla": True}, "layout", "mla"),
        ({"mc__quantization": "fp8"}, "variant", "vllm/cpu/LBHNC/[8,16,128]/hash=sha256/quant=fp8"),
        ({"cc__block_size": 32}, "block_size", 32),
        ({"cc__cache_dtype": "fp8_e4m3"}, "kv_dtype", "fp8_e4m3"),
        ({"cc__kv_cache_layout": "LBNHC"}, "layout", "nhd"),
        ({"cc__kv_cache_layout": None}, "variant", "vllm/cpu/default/[8,16,128]/hash=sha256"),
        ({"cc__prefix_caching_hash_algo": "xxhash"}, "variant", "vllm/cpu/LBHNC/[8,16,128]/hash=xxhash"),
        ({"pc__tensor_parallel_size": 4}, "tp_size", 4),
        ({"pc__pipeline_parallel_size": 2}, "pp_size", 2),
    ],
)
def test_engine_namespace_fields_come_from_the_config(change: dict, field: str, value: object) -> None:
    base = engine_namespace(_fake_vllm_config("org/model"), 28, "[8,16,128]", "cpu")
    changed = engine_namespace(_fake_vllm_config("org/model", **change), 28, "[8,16,128]", "cpu")
    assert getattr(changed, field) == value
    assert changed != base


def test_engine_namespace_without_optional_attributes(tmp_path: Path) -> None:
    """A config without revision/quantization/use_mla/kv_cache_layout still gives a namespace;
    a local model directory gives its fingerprinted identity."""
    (tmp_path / "config.json").write_text("{}")
    config = _fake_vllm_config(str(tmp_path))
    for attr in ("revision", "quantization", "use_mla"):
        delattr(config.model_config, attr)
    delattr(config.cache_config, "kv_cache_layout")
    ns = engine_namespace(config, 2, "2x[16,8,64]", "cpu")
    assert ns.model == model_identity(str(tmp_path), None) and ns.model.startswith(str(tmp_path))
    assert ns.layout == "nhd" and ns.variant == "vllm/cpu/default/2x[16,8,64]/hash=sha256"
    # The block shape and device are part of the variant.
    assert engine_namespace(config, 2, "[16,8,128]", "cpu") != ns
    assert engine_namespace(config, 2, "2x[16,8,64]", "cuda") != ns
    assert engine_namespace(config, 3, "2x[16,8,64]", "cpu").num_layers == 3


@pytest.mark.server
def test_engine_namespace_is_accepted_by_the_server(server: str) -> None:
    config = _fake_vllm_config("org/model", pc__tensor_parallel_size=1)
    ns = engine_namespace(config, TEST_LAYERS, "2x[16,8,64]", "cpu")
    with kvloft.Client(server, timeout=10) as a, kvloft.Client(server, timeout=10) as b:
        reply = a.register_instance("engine-ns", ns)
        again = engine_namespace(_fake_vllm_config("org/model", pc__tensor_parallel_size=1), TEST_LAYERS,
                                 "2x[16,8,64]", "cpu")
        assert b.register_instance("engine-ns", again)["namespace_id"] == reply["namespace_id"]
        assert reply["slices_per_block"] == 1
    with kvloft.Client(server, timeout=10) as c:
        other = c.register_instance("engine-other", make_namespace())
        assert other["namespace_id"] != reply["namespace_id"]


def test_geometry_of_a_tensor_like_object() -> None:
    class FakeTensor:
        shape = (2, 3, 4)

        def stride(self) -> tuple[int, ...]:
            return (12, 4, 1)

        def element_size(self) -> int:
            return 2

        def data_ptr(self) -> int:
            return 4096

    assert TensorGeometry.of(FakeTensor()) == TensorGeometry((2, 3, 4), (12, 4, 1), 2, 4096)


def test_torch_ipc_handles_are_unwrapped() -> None:
    from kvloft.gpu import cuda_ipc_handle

    raw = bytes(range(64))
    assert cuda_ipc_handle(raw) == raw, "a bare cudaIpcMemHandle_t passes through"
    assert cuda_ipc_handle(b"\x02c" + raw) == raw, "torch's versioned cudaMalloc handle loses its 2-byte prefix"
    with pytest.raises(ValueError, match="expandable_segments"):
        cuda_ipc_handle(b"\x02e" + bytes(100))
    with pytest.raises(ValueError, match="unrecognised"):
        cuda_ipc_handle(bytes(10))
