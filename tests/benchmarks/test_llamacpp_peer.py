"""The llama.cpp peer of the serving benchmark (`benchmarks/llamacpp.py`): the F32 and BF16 copies of
a GGUF file hold the dequantized weights (rounded to bfloat16 as torch rounds them) and the same
metadata; the server command carries the benchmark's settings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from specserve.server.bench import client
from specserve.server.bench.workload import user


def tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A GGUF file with a Q8_0, a Q4_1 and an F32 tensor and metadata of several value types; the
    tensors' dequantized values by name."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_context_length(64)
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_token_scores([0.0, -1.5, -2.5])
    values = {}
    for name, qtype, shape in (("q8", gguf.GGMLQuantizationType.Q8_0, (4, 64)),
                               ("q4", gguf.GGMLQuantizationType.Q4_1, (3, 32)),
                               ("norm", gguf.GGMLQuantizationType.F32, (64,))):
        data = rng.standard_normal(shape).astype(np.float32)
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
        values[name] = gguf.quants.dequantize(packed, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_float_copy_holds_the_dequantized_weights_and_the_metadata(benchmark_script, tmp_path, dtype):
    llamacpp = benchmark_script("llamacpp")
    source = tmp_path / "tiny.Q4_1.gguf"
    values = tiny_gguf(source)
    copy = llamacpp.float_gguf(source, tmp_path / "tiny.copy.gguf", dtype)
    original, converted = gguf.GGUFReader(source), gguf.GGUFReader(copy)
    tensor_type, file_type = llamacpp.FLOAT_TYPES[dtype]
    for tensor in converted.tensors:
        expected = torch.from_numpy(values[tensor.name])
        if tensor.name == "norm":  # 1-D: F32 in every copy
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        else:  # what specserve serves: the dequantized float32 weights, cast to the dtype by torch
            assert tensor.tensor_type == tensor_type
            expected = expected.to(getattr(torch, dtype)).float()
        read = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(read)), expected)
    assert {t.name for t in converted.tensors} == set(values)
    assert [list(t.shape) for t in converted.tensors] == [list(t.shape) for t in original.tensors]

    def metadata(reader) -> dict:
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}

    expected = metadata(original) | {"general.file_type": int(file_type)}
    assert metadata(converted) == expected
    assert expected["tokenizer.ggml.tokens"] == ["<s>", "a", "b"]  # arrays survive, not only scalars


def test_an_existing_copy_is_not_rewritten(benchmark_script, tmp_path):
    llamacpp = benchmark_script("llamacpp")
    source, dest = tmp_path / "tiny.gguf", tmp_path / "tiny.F32.gguf"
    tiny_gguf(source)
    dest.write_bytes(b"kept")
    assert llamacpp.float_gguf(source, dest) == dest and dest.read_bytes() == b"kept"


def test_a_model_without_a_gguf_source_is_refused(benchmark_script, tiny_model_dirs):
    llamacpp = benchmark_script("llamacpp")
    assert llamacpp.store_gguf("/x/model.gguf") == Path("/x/model.gguf")
    with pytest.raises(ValueError, match="has no GGUF file in the store"):
        llamacpp.store_gguf(str(tiny_model_dirs["llama"]))


def test_prompt_lookup_is_an_option_of_the_same_command(benchmark_script):
    llamacpp = benchmark_script("llamacpp")
    plain = llamacpp.server_command("py", Path("m.gguf"), "127.0.0.1", 8000, 2, 2048, prompt_lookup=False)
    lookup = llamacpp.server_command("py", Path("m.gguf"), "127.0.0.1", 8000, 2, 2048, prompt_lookup=True)
    assert plain[:3] == ["py", "-m", "llama_cpp.server"] and lookup[:len(plain)] == plain
    assert lookup[len(plain):] == ["--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens",
                                   str(llamacpp.PROMPT_LOOKUP_TOKENS)]
    assert plain[plain.index("--n_threads") + 1] == "2" and plain[plain.index("--n_ctx") + 1] == "2048"
    assert plain[plain.index("--interrupt_requests") + 1] == "False"  # concurrent clients queue, none is cut off


@pytest.mark.parametrize(("dtype", "float_type"), [("float32", "F32"), ("bfloat16", "BF16")])
def test_the_sweep_gets_both_files_plain_and_with_prompt_lookup(benchmark_script, tmp_path, monkeypatch, dtype,
                                                                float_type):
    serving = benchmark_script("serving")
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.Q4_1.gguf"
    tiny_gguf(source)
    args = serving.argparse.Namespace(gguf=str(source), model="tiny", threads=1, max_model_len=None,
                                      llamacpp_python="py", dtype=dtype)
    servers = serving.llamacpp_servers(args)
    label = f"llama.cpp {float_type.lower()}"
    assert [s.label for s in servers] == [label, f"{label}+lookup", "llama.cpp Q4_1", "llama.cpp Q4_1+lookup"]
    copy = tmp_path / "cache" / "benchmarks" / f"tiny.Q4_1.{float_type}.gguf"
    assert gguf.GGUFReader(copy).get_field("general.file_type").contents() == int(
        serving.FLOAT_TYPES[dtype][1])
    assert [s.command[s.command.index("--model") + 1] for s in servers] == [str(copy)] * 2 + [str(source)] * 2
    assert all(s.draft is None and s.ready_path == "/v1/models" for s in servers)
    assert len({s.env["PORT"] for s in servers}) == 4


def test_a_stream_without_usage_counts_the_tokens_of_its_text(tiny_model_dirs):
    """llama.cpp's stream carries no usage (and with prompt lookup it reports "stop" where it stopped
    for length): `specserve bench`'s client, which the sweep uses, counts the tokens of the streamed
    text under the model's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    pieces = ["the quick", " brown fox", " jumps"]

    def sse(usage: dict | None) -> bytes:
        chunks = [{"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]},
                  *({"choices": [{"delta": {"content": p}, "finish_reason": None}]} for p in pieces),
                  {"choices": [{"delta": {}, "finish_reason": "stop"}]}]
        chunks += [{"choices": [], "usage": usage}] if usage else []
        return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"

    async def one(usage: dict | None):
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=sse(usage)))
        options = client.Options(max_tokens=7, ignore_eos=True,
                                 count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False).input_ids))
        async with httpx.AsyncClient(transport=transport, base_url="http://peer") as http:
            return await client.stream_one(http, client.Target("http://peer", "m", "peer"), user("hi"), options, 0)

    counted = asyncio.run(one(None))
    expected = len(tokenizer("".join(pieces), add_special_tokens=False).input_ids)
    assert (counted.error, counted.tokens, len(counted.itls)) == (None, expected, 4)
    assert expected > len(pieces)  # the count is the tokenizer's, not the chunks'
    assert asyncio.run(one({"completion_tokens": 3})).tokens == 3  # usage, when streamed, is the count
