"""Where a shard set lives, and opening its shards through webdataset's openers.

`data.shards` (`--data`) names a shard set in one of three forms:

    shards/chq256                     a local folder with index.json and the shards (scripts/make_shards.py)
    http://host/chq256/               a URL prefix: http://host/chq256/index.json lists the shards beside it
    'pipe:aws s3 cp s3://b/chq256/shard-{000000..000099}.tar -'
        with data.index='pipe:aws s3 cp s3://b/chq256/index.json -'
                                      a brace pattern or pipe: command: one shard per expansion, in index
                                      order (each expansion must contain its shard's name); `data.index`
                                      names the index in any form below

Shards and remote indexes are opened by `webdataset.gopen`: local paths, `pipe:` commands, http(s):// (through
curl) and its other URL handlers (gs://, ais://, hf://, ...; `GOPEN_REWRITE` applies). With a cache folder
(`data.shard_cache`) a remote shard is downloaded once by webdataset's `FileCache`, checked against the SHA-256
in the index, and read from that copy afterwards. Copies are named by their digest, so shard sets sharing a
cache never mix and a rewritten set is fetched anew. Without a cache a remote shard is streamed every epoch
(not checked against its digest; unreadable samples are still skipped and counted by the reader).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from braceexpand import braceexpand
from webdataset.cache import FileCache
from webdataset.gopen import gopen, gopen_schemes

from data.shards import INDEX_NAME, check_index, read_index
from models.files import file_digest
from trainer.errors import UserError

CURL_SCHEMES = ("http", "https", "sftp", "ftps", "scp", "htgs", "hf")  # webdataset opens these with curl


@dataclass(frozen=True)
class ShardLocation:
    """A shard set named by a URL prefix, a brace pattern or a `pipe:` command rather than a local folder."""

    data: str                      # the URL prefix, brace pattern or pipe: command (`data.shards`)
    index: str | None = None       # where index.json is (`data.index`; required for patterns and pipe:)
    cache_dir: str | None = None   # local copies of remote shards (`data.shard_cache`; None: stream them)

    def __str__(self) -> str:
        return self.data


def is_url(text: str) -> bool:
    """Whether webdataset opens `text` as a URL (`scheme://...` or `pipe:...`) rather than as a local path."""
    return text.startswith("pipe:") or "://" in text


def is_pattern(text: str) -> bool:
    """Whether `text` names several shards (a brace pattern) or is a `pipe:` command."""
    return text.startswith("pipe:") or list(braceexpand(text)) != [text]


def shard_location(shards: str, index: str | None = None, cache_dir: str | None = None) -> Path | ShardLocation:
    """What `data.shards` names: a local folder (a Path, read as ever) or a ShardLocation."""
    if index is None and not is_url(shards) and not is_pattern(shards):
        return Path(shards).expanduser()
    return ShardLocation(shards, index, str(Path(cache_dir).expanduser()) if cache_dir else None)


def open_shard_set(source: str | Path | ShardLocation) -> dict:
    """The validated index of a shard set, each shard entry with its `"url"`; `"root"` says where the set
    lives (for messages) and `"cache_dir"` where remote shards are cached (None: streamed)."""
    if not isinstance(source, ShardLocation):
        source = shard_location(str(source))
    if isinstance(source, Path):
        index = read_index(source)
        # Absolute, so that gopen never reads a relative name with a colon as a URL scheme.
        root = Path(index["root"]).resolve()
        for entry in index["shards"]:
            entry["url"] = str(root / entry["name"])
        index["cache_dir"] = None
        return index
    if source.index is None:
        if is_pattern(source.data):
            raise UserError(f"data.shards '{source.data}' is a brace pattern or a pipe: command: set data.index "
                            f"to where its {INDEX_NAME} is (a path, a URL or a pipe: command)")
        index_url = source.data if source.data.endswith(".json") else f"{source.data.rstrip('/')}/{INDEX_NAME}"
        index = read_remote_index(index_url)
        prefix = index_url.rsplit("/", 1)[0]
        urls = [f"{prefix}/{entry['name']}" for entry in index["shards"]]
    else:
        index = read_remote_index(source.index)
        urls = _expanded_urls(source.data, index, source.index)
    for url in urls:
        _check_opener(url)
    for entry, url in zip(index["shards"], urls):
        entry["url"] = url
    index["root"], index["cache_dir"] = source.data, source.cache_dir
    return index


def read_remote_index(url: str) -> dict:
    """Load and validate an index.json that webdataset opens (path, URL or pipe: command)."""
    _check_opener(url)
    try:
        with gopen(url) as stream:  # closing checks the exit status of curl / the pipe command
            text = stream.read()
        index = json.loads(text)
    except (OSError, ValueError) as err:
        raise UserError(f"shard index {url} could not be read ({type(err).__name__}: {error_message(err)})") from None
    check_index(index, url)
    index.setdefault("has_labels", False)
    return index


def _expanded_urls(pattern: str, index: dict, index_url: str) -> list[str]:
    """The brace expansion of `pattern`: one URL per index entry, in order, each naming its shard."""
    urls = list(braceexpand(pattern))
    names = [entry["name"] for entry in index["shards"]]
    if len(urls) != len(names):
        raise UserError(f"data.shards '{pattern}' expands to {len(urls)} URLs but {index_url} lists "
                        f"{len(names)} shards")
    for position, (url, name) in enumerate(zip(urls, names)):
        if name not in url:
            raise UserError(f"data.shards: expansion {position} '{url}' does not contain '{name}', shard "
                            f"{position} of {index_url}; list the shards in index order")
    return urls


def _check_opener(url: str) -> None:
    """A UserError now, rather than every sample skipped later, when webdataset cannot open `url`."""
    scheme = "pipe" if url.startswith("pipe:") else urlparse(url).scheme
    if scheme in ("", "file", "pipe"):
        return
    if scheme not in gopen_schemes:
        raise UserError(f"webdataset cannot open '{url}': no handler for {scheme}:// (it knows "
                        f"{', '.join(sorted(k for k in gopen_schemes if not k.startswith('_')))}); "
                        f"use a pipe: command, e.g. 'pipe:aws s3 cp s3://bucket/shard.tar -'")
    if scheme in CURL_SCHEMES and shutil.which("curl") is None:
        raise UserError(f"webdataset opens {scheme}:// URLs with curl, which is not installed")


def error_message(err: BaseException) -> str:
    """The message of an exception, without the stream and URL webdataset appends to its arguments."""
    return str(err.args[0]) if err.args else type(err).__name__


# --------------------------------------------------------------------------------------------
# Opening one shard
# --------------------------------------------------------------------------------------------

def open_shard(url: str, sha256: str | None = None, cache_dir: str | None = None) -> IO[bytes]:
    """A byte stream of one shard: through webdataset's gopen, or from its verified copy in `cache_dir`."""
    if cache_dir is None or sha256 is None or not is_url(url) or url.startswith("file:"):
        return gopen(url)
    return open(cached_shard(url, sha256, cache_dir), "rb")


def cached_shard(url: str, sha256: str, cache_dir: str) -> str:
    """The local copy of a remote shard, downloaded into `cache_dir` by webdataset's FileCache when missing.

    The copy is named by its SHA-256. A download whose digest differs from the index is deleted and raises
    ValueError; a failed download leaves nothing (FileCache renames a download into place only when complete).
    """
    name = f"{sha256}.tar"

    def matches_index(path: str) -> bool:  # FileCache calls this after each download
        if file_digest(path) != sha256:
            os.remove(path)
            raise ValueError(f"{url}: the downloaded shard does not match the sha256 in the index")
        return True

    cache = FileCache(cache_dir, url_to_name=lambda _url: name, validator=matches_index)
    try:
        return cache.get_file(url)
    except BaseException:
        # FileCache's download writes `<name>.temp<pid>` and renames it when complete; a failed one stays.
        Path(cache_dir, f"{name}.temp{os.getpid()}").unlink(missing_ok=True)
        raise
