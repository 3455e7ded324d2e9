"""Models by hub id: `org/name` is fetched from the Hugging Face hub over plain HTTPS (config,
tokenizer files, safetensors, sharded too) into a local cache, resuming partial files and checking
their sizes. HF_TOKEN is sent for gated models; HF_ENDPOINT points elsewhere (the tests use a server
on 127.0.0.1); SWAT_MODEL_CACHE moves the cache (default ~/.cache/swat-min)."""

import http.client
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from . import checkpoint
from .files import SwatError


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follows the hub's redirects (weights come from a CDN on another host) with the Range header,
    but sends HF_TOKEN only to the host it was meant for: urllib would pass it on to any host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if (
            new
            and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc
        ):
            new.remove_header("Authorization")
        return new


FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


def resolve(m):
    """A local path stays as it is; a hub id org/name becomes its cached directory (downloaded if
    need be)."""
    return fetch(m) if not os.path.exists(m) and re.fullmatch(r"[\w.-]+/[\w.-]+", m) else m


def fetch(repo):
    """Download a hub repo's config, tokenizer and safetensors (sharded too) over HTTPS into the
    cache,
    resuming partial files and checking sizes. HF_ENDPOINT overrides the server (tests use a local
    one)."""
    base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    d = os.path.join(
        os.environ.get("SWAT_MODEL_CACHE", os.path.expanduser("~/.cache/swat-min")),
        "hub",
        repo.replace("/", "--"),
    )
    done = os.path.join(d, ".complete")  # a finished download is used as it is, offline too
    if os.path.exists(done):
        return d
    os.makedirs(d, exist_ok=True)

    def get(name, required=True):
        dst = os.path.join(d, name)
        part = os.path.join(d, name + ".part")  # a partial download, resumed where it stopped
        url = f"{base}/{repo}/resolve/main/{name}"
        # a typo?
        lead = f"{repo}: no such local directory; from the hub: " if name == "config.json" else ""
        if os.path.exists(dst):
            return True
        have = os.path.getsize(part) if os.path.exists(part) else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        if os.environ.get("HF_TOKEN"):
            req.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
        try:
            r = urllib.request.build_opener(_Redirect).open(req, timeout=60)
            have = have if r.status == 206 else 0  # the server may ignore the range: start over
            size = (
                have + int(r.headers["Content-Length"]) if r.headers.get("Content-Length") else None
            )
            with open(part, "ab" if have else "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except urllib.error.HTTPError as e:
            if (
                e.code == 416 and have
            ):  # nothing after the partial file: it was whole but never renamed; fetch anew
                os.remove(part)
                return get(name, required)
            if e.code == 404 and not required:
                return False
            hint = " (a private or gated model? set HF_TOKEN)" if e.code in (401, 403) else ""
            raise SwatError(f"{lead}{url}: HTTP {e.code}{hint}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise SwatError(
                f"{lead}{url}: download failed ({getattr(e, 'reason', e)}); run again to resume"
            ) from None
        if size is not None and os.path.getsize(part) != size:
            raise SwatError(
                f"{dst}: incomplete ({os.path.getsize(part)} of {size} bytes); run again to resume"
            )
        os.replace(part, dst)
        return True

    try:
        for name in FILES:
            get(name, required=name in ("config.json", "tokenizer.json"))
    except SwatError:
        if not os.listdir(d):  # nothing fetched (a mistyped id?): no empty folder left in the cache
            os.rmdir(d)
        raise
    if get("model.safetensors.index.json", required=False):
        for shard in checkpoint.weight_files(d):
            get(shard)
    elif not get("model.safetensors", required=False):
        raise SwatError(
            f"{repo}: no safetensors weights on the hub (swat-min never reads pickles such as .bin)"
        )
    open(done, "w").close()
    return d
