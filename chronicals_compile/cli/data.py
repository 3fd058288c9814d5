"""Data for ``chronicals finetune``: the embedded default, user files, tokenization.

The embedded default needs no network and no download: the docstrings of the Python standard
library (present in every installation) become instruction/answer pairs, ``"Explain json.dumps."``
-> its docstring, held in a ``datasets.Dataset``. A byte-level BPE tokenizer is trained on that
corpus with ``tokenizers`` in about a second, so the default model's vocabulary is the
tokenizer's size.

Tokenization follows supervised fine-tuning practice: prompt and response are tokenized
separately and concatenated (so the boundary is exact), the response ends with EOS, and the
prompt's labels are ``-100`` so only response tokens are scored. Plain ``text`` data is scored
everywhere.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from typing import Any

IGNORE_INDEX = -100

#: Standard-library modules whose public functions and classes supply the default corpus.
#: Pure-Python or always-built modules only (no tkinter, no optional C extensions), sorted so the
#: corpus is the same from run to run on one Python version.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath",
    "code", "codecs", "codeop", "collections", "colorsys", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.utils",
    "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "html", "http.client", "importlib", "inspect", "io",
    "ipaddress", "itertools", "json", "keyword", "locale", "logging", "lzma", "math",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil",
    "platform", "pprint", "queue", "random", "re", "reprlib", "runpy", "sched", "secrets",
    "shelve", "shlex", "shutil", "smtplib", "socket", "sqlite3", "stat", "statistics", "string",
    "struct", "subprocess", "symtable", "sysconfig", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "token", "tokenize", "trace", "traceback", "types", "typing",
    "unicodedata", "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref",
    "xml.etree.ElementTree", "zipfile", "zlib",
)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class DataError(ValueError):
    """Bad user input about data: reported as one ``chronicals: error:`` line, exit code 2."""


# --------------------------------------------------------------------------- embedded default

def stdlib_pairs(min_chars: int = 40, max_chars: int = 1200) -> list[dict[str, str]]:
    """``{"prompt": "Explain mod.name.", "response": docstring}`` for the stdlib's documented API.

    Functions, classes and builtins defined by each module (re-exports skipped), each docstring
    once, docstrings shorter than ``min_chars`` skipped and longer ones cut at ``max_chars``
    on a paragraph boundary when there is one.
    """
    import warnings

    with warnings.catch_warnings():  # deprecated aliases (typing.io...) warn when their doc is read
        warnings.simplefilter("ignore")
        return _stdlib_pairs(min_chars, max_chars)


def _stdlib_pairs(min_chars: int, max_chars: int) -> list[dict[str, str]]:
    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # pragma: no cover - a stripped-down Python build
            continue
        root = module_name.split(".")[0]
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_"):
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            owner = getattr(obj, "__module__", None) or ""
            if owner and not owner.lstrip("_").startswith(root.lstrip("_")):
                continue  # re-exported from elsewhere
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < min_chars or doc in seen:
                continue
            seen.add(doc)
            pairs.append({"prompt": f"Explain {module_name}.{name}.\n", "response": _clip(doc, max_chars)})
    return pairs


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > max_chars // 3 else max_chars].rstrip()


def default_dataset():
    """The embedded instruction dataset as a ``datasets.Dataset`` (prompt, response)."""
    import datasets

    return datasets.Dataset.from_list(stdlib_pairs())


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (saveable with save_pretrained)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


# --------------------------------------------------------------------------- user datasets

def load_dataset_path(path: str):
    """A local jsonl/json/parquet file, or a folder written by ``save_to_disk``."""
    import datasets

    if not os.path.exists(path):
        raise DataError(f"dataset {path!r} does not exist")
    if os.path.isfile(path) and not open(path, "rb").read(4096).strip():
        raise DataError(f"dataset {path!r} is empty")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # errors reach the user once, below
    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"dataset folder {path!r} has splits {list(ds)} but no 'train' split")
                ds = ds["train"]
            return ds
        lower = path.lower()
        if lower.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            return datasets.Dataset.from_json(path, keep_in_memory=True)
        if lower.endswith(".parquet"):
            return datasets.Dataset.from_parquet(path, keep_in_memory=True)
    except DataError:
        raise
    except Exception as err:  # malformed file: one line, not a traceback
        root = err
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        raise DataError(f"could not read dataset {path!r}: {type(root).__name__}: {_first_line(root)}") from err
    finally:
        datasets.logging.set_verbosity(verbosity)
    raise DataError(f"dataset {path!r}: expected a .jsonl, .json or .parquet file or a save_to_disk folder")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


@dataclasses.dataclass(frozen=True)
class Fields:
    """Which columns hold the data: ``text`` alone, or ``prompt`` + ``response``."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None

    @property
    def supervised(self) -> bool:
        return self.prompt is not None


def resolve_fields(columns: list[str], text: str | None = None, prompt: str | None = None,
                   response: str | None = None) -> Fields:
    """Explicit field flags win; otherwise ``prompt``/``response`` columns, else ``text``."""
    def need(name: str, flag: str) -> str:
        if name not in columns:
            raise DataError(f"{flag} {name!r} is not a field of the dataset (fields: {', '.join(columns)})")
        return name

    if text is not None:
        if prompt is not None or response is not None:
            raise DataError("use either --text-field or --prompt-field/--response-field, not both")
        return Fields(text=need(text, "--text-field"))
    if prompt is not None or response is not None:
        return Fields(prompt=need(prompt or "prompt", "--prompt-field"),
                      response=need(response or "response", "--response-field"))
    if "prompt" in columns and "response" in columns:
        return Fields(prompt="prompt", response="response")
    if "text" in columns:
        return Fields(text="text")
    raise DataError(
        f"the dataset has no 'text' field and no 'prompt'/'response' fields (fields: {', '.join(columns)}); "
        "name them with --text-field or --prompt-field/--response-field"
    )


def corpus_texts(ds, fields: Fields) -> list[str]:
    """All text of the dataset, for training a tokenizer."""
    if fields.supervised:
        return [str(p) + str(r) for p, r in zip(ds[fields.prompt], ds[fields.response])]
    return [str(t) for t in ds[fields.text]]


@dataclasses.dataclass
class TokenizedData:
    dataset: Any  # datasets.Dataset with input_ids, labels
    truncated: int  # examples cut at max_len
    longest_prompt: int


def tokenize(ds, tokenizer, fields: Fields, max_len: int) -> TokenizedData:
    """``input_ids`` and ``labels`` columns; ``-100`` on prompt tokens; EOS after every example.

    Prompt/response examples longer than ``max_len`` are truncated (their response is cut):
    splitting them would leave pieces whose response has lost its prompt. Text examples are kept
    whole here and split into ``max_len`` pieces by the packer. A prompt that leaves no room for a
    single response token is an error, not a silent drop.
    """
    if len(ds) == 0:
        raise DataError("the dataset is empty")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token")

    def encode(texts, special: bool) -> list[list[int]]:
        return tokenizer([str(t) for t in texts], add_special_tokens=special)["input_ids"]

    if fields.supervised:
        def fn(batch):
            prompts = encode(batch[fields.prompt], True)
            responses = encode(batch[fields.response], False)
            ids, labels, cut, plen = [], [], [], []
            for p, r in zip(prompts, responses):
                full = p + r + [eos]
                lab = [IGNORE_INDEX] * len(p) + r + [eos]
                cut.append(len(full) > max_len)
                plen.append(len(p))
                ids.append(full[:max_len])
                labels.append(lab[:max_len])
            return {"input_ids": ids, "labels": labels, "_cut": cut, "_plen": plen}
    else:
        def fn(batch):
            ids = [t + [eos] for t in encode(batch[fields.text], True)]
            return {"input_ids": ids, "labels": [list(t) for t in ids], "_cut": [False] * len(ids),
                    "_plen": [0] * len(ids)}

    out = ds.map(fn, batched=True, remove_columns=ds.column_names, desc=None, keep_in_memory=True)
    plens = out["_plen"]
    longest = max(plens) if plens else 0
    if fields.supervised and longest >= max_len:
        worst = plens.index(longest)
        raise DataError(
            f"--max-len {max_len} is not longer than the longest prompt ({longest} tokens, example {worst}); "
            "raise --max-len so every response has room"
        )
    truncated = sum(out["_cut"])
    out = out.remove_columns(["_cut", "_plen"])
    out = out.filter(lambda lab: any(x != IGNORE_INDEX for x in lab[1:]), input_columns="labels",
                     keep_in_memory=True)
    if len(out) == 0:
        raise DataError("no example has a token to train on (empty texts or responses?)")
    return TokenizedData(out, truncated, longest)
