"""Bundle the model code MoE Chat can run, plus every config and tokenizer, and no other model code.

`transformers/models/__init__.py` names all ~560 model packages under `if TYPE_CHECKING:`, and
PyInstaller follows those imports, so by default the bundle would carry the code of every model. The
engine loads a model through `AutoModelForCausalLM`, and transformers imports a model's code lazily, by
name, from the `model_type` in its config.json. So this hook (next to the maintained
hook-transformers.py, which still collects the metadata and `.py` sources transformers needs) keeps whole:

- every package `AutoModelForCausalLM` maps a model type to (all the MoE architectures, and the dense
  models that run as plain models), `auto` and `encoder_decoder` (imported whenever a model loads),
- the model packages that transformers' own code (outside `models/`) imports from,
- whatever those import from other model packages (followed until nothing new turns up).

Every other package (vision, audio, encoders, ...) keeps its lazy `__init__`, its `configuration_*` and
its `tokenization_*` modules, with the helper modules they import: a fine-tune's tokenizer_config.json
may name any tokenizer class, looking one up by name imports each package that the name is mapped to,
and a config that loads lets the engine say why it cannot chat with such a model, as it does from source.
"""

import re
from pathlib import Path

from PyInstaller import isolated
from PyInstaller.utils.hooks import get_package_paths, logger

MODELS_DIR = Path(get_package_paths("transformers")[1]) / "models"
ALWAYS = {"auto", "encoder_decoder"}
PARTIAL_PREFIXES = ("configuration_", "tokenization_")  # what the other packages keep
DEV_ONLY = ("modular_", "convert_")  # files that generate or convert code; never imported at run time
# `from ..llama.modeling_llama import`, `from ...models.llama import`, `from transformers.models.llama import`
# (in transformers' core, `from .models.llama` and `from ..models.llama` too)
OTHER_PACKAGE = re.compile(r"^\s*from\s+(?:\.\.|\.+models\.|transformers\.models\.)([a-z0-9_]+)(?:\.([a-z0-9_]+))?"
                           r"\s+import", re.MULTILINE)
SAME_PACKAGE = re.compile(r"^\s*from\s+\.([a-z0-9_]+)\s+import", re.MULTILINE)  # `from .english_normalizer import`


@isolated.decorate
def causal_lm_packages() -> list[str]:
    """The model packages behind every model type `AutoModelForCausalLM` can load."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted({model_type_to_module_name(t) for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES})


def _submodules(package: str) -> list[str]:
    """A model package's modules and subpackages, by their short names."""
    return sorted(p.stem for p in (MODELS_DIR / package).iterdir()
                  if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists())


def _source(package: str, module: str) -> str:
    path = MODELS_DIR / package / f"{module}.py"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def plan() -> tuple[set[str], dict[str, set[str]], list[str]]:
    """(packages kept whole, {other package: the modules kept of it}, suppressed imports)."""
    packages = sorted(p.name for p in MODELS_DIR.iterdir() if (p / "__init__.py").exists())
    keep = (set(ALWAYS) | set(causal_lm_packages())) & set(packages)
    core = [f for f in MODELS_DIR.parent.rglob("*.py") if MODELS_DIR not in f.parents]
    keep |= {p for f in core for p, m in OTHER_PACKAGE.findall(f.read_text(encoding="utf-8"))
             if p in packages and not m.startswith(PARTIAL_PREFIXES)}
    while True:  # until no package has to be kept whole any more
        partial = {p: {m for m in _submodules(p) if m.startswith(PARTIAL_PREFIXES)} for p in packages if p not in keep}
        for p, mods in partial.items():
            mods |= {m for kept in list(mods) for m in SAME_PACKAGE.findall(_source(p, kept)) if m in _submodules(p)}
        sources = [_source(p, m) for p in keep for m in _submodules(p) if not m.startswith(DEV_ONLY)]
        sources += [_source(p, m) for p, mods in partial.items() for m in mods]
        wanted = {p for s in sources for p, m in OTHER_PACKAGE.findall(s) if p in partial and m not in partial[p]}
        if not wanted:
            break
        keep |= wanted
    excluded = [f"transformers.models.{p}.{m}" for p, mods in partial.items() for m in _submodules(p) if m not in mods]
    return keep, partial, excluded


_keep, _partial, excludedimports = plan()
hiddenimports = [f"transformers.models.{p}" for p in sorted(_keep | set(_partial))]
hiddenimports += [f"transformers.models.{p}.{m}" for p, mods in sorted(_partial.items()) for m in sorted(mods)]
logger.info("hook-transformers.models: keeping %d model packages whole, %d as configs and tokenizers only; "
            "suppressing %d imports", len(_keep), len(_partial), len(excludedimports))
