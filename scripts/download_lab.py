"""Fetch the NYU CSAW-HackML lab 3 files (the BadNet B and its four data sets) for a sweep.

    python scripts/download_lab.py --dest lab            # the data sets are large; then:
    .venv/bin/python -m jobs.sweep --model lab/models/bd_net.h5 --data lab/data --single-node --out results/lab
    python scripts/download_lab.py --dest lab --dry-run  # what would be fetched, no network

Layout under DEST: models/bd_net.h5, models/bd_weights.h5 (from the lab's GitHub repository)
and data/cl/valid.h5, data/cl/test.h5, data/bd/bd_valid.h5, data/bd/bd_test.h5 (from the lab's
public Google Drive folder). Each file is written to ``NAME.partial`` and renamed when complete
and checked (sha256 where known, else the HDF5 signature); files already in place and valid are
skipped, so a rerun resumes. Only the standard library is used.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import html
import http.client
import http.cookiejar
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_RAW = "https://raw.githubusercontent.com/csaw-hackml/CSAW-HackML-2020/master/lab3/models/"
DRIVE_FOLDER = "1Rs68uH8Xqa4j6UxG53wzD0uyI8347dSq"  # lab3/README.md: "Download the ... datasets"
DRIVE_FOLDER_URL = f"https://drive.google.com/drive/folders/{DRIVE_FOLDER}"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
BLOCK = 1 << 20
TIMEOUT_S = 60
USER_AGENT = "Mozilla/5.0 (fine-pruning download_lab.py)"
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}  # writing the file


@dataclass(frozen=True)
class LabFile:
    """One file of the lab: where it goes under DEST, where it comes from, what it must hash to."""

    dest: str
    url: str | None = None        # a direct URL (GitHub), or None for a Drive folder file
    drive_name: str | None = None  # its name in the Drive folder
    sha256: str | None = None
    size: int | None = None


LAB_FILES = (
    LabFile("models/bd_net.h5", url=REPO_RAW + "bd_net.h5"),
    LabFile("models/bd_weights.h5", url=REPO_RAW + "bd_weights.h5", size=2442796,
            sha256="68ec7afdfc570d39acbded72025fe37d4d14e770585001d75a393490d50fc629"),
    LabFile("data/cl/valid.h5", drive_name="valid.h5"),
    LabFile("data/cl/test.h5", drive_name="test.h5"),
    LabFile("data/bd/bd_valid.h5", drive_name="bd_valid.h5"),
    LabFile("data/bd/bd_test.h5", drive_name="bd_test.h5"),
)


class DownloadError(RuntimeError):
    """A failed fetch or check; the message is one line naming the file and what to do."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise DownloadError(f"{message} (see python scripts/download_lab.py --help)")


OPENER = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def open_url(url: str):
    """GET ``url`` (cookies kept for Drive's confirmation); network failures become DownloadError."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return OPENER.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"{url}: {reason}; check the internet connection") from None


def is_page(response) -> bool:
    return response.headers.get_content_type() == "text/html"


def attributes(tag: str) -> dict[str, str]:
    return {name: html.unescape(value) for name, value in re.findall(r'([\w-]+)="([^"]*)"', tag)}


def drive_confirm_url(page: str, file_id: str) -> str:
    """The URL behind Drive's "can't scan this file for viruses" page: the download form's
    action and hidden fields, else a ``confirm=`` token in a link, else ``confirm=t``."""
    form = re.search(r'(<form[^>]*id="download-form"[^>]*>)(.*?)</form>', page, re.S)
    if form and "action" in attributes(form.group(1)):
        fields = [attributes(tag) for tag in re.findall(r"<input[^>]*>", form.group(2))]
        query = {f["name"]: f.get("value", "") for f in fields
                 if f.get("type") == "hidden" and "name" in f}
        return attributes(form.group(1))["action"] + "?" + urllib.parse.urlencode(query)
    token = re.search(r"confirm=([0-9A-Za-z_-]+)", page)
    confirm = token.group(1) if token else "t"
    return ("https://drive.usercontent.google.com/download?"
            + urllib.parse.urlencode({"id": file_id, "export": "download", "confirm": confirm}))


def open_drive_file(file_id: str):
    """A response streaming Drive file ``file_id``, past the large-file confirmation page."""
    response = open_url(f"https://drive.google.com/uc?export=download&id={file_id}")
    if not is_page(response):
        return response
    with response:
        page = response.read(BLOCK).decode("utf-8", "replace")
    if re.search(r"quota exceeded|too many users have", page, re.I):
        raise DownloadError(f"Google Drive file {file_id}: download quota exceeded; try again "
                            f"later or download it by hand from {DRIVE_FOLDER_URL}")
    response = open_url(drive_confirm_url(page, file_id))
    if is_page(response):
        response.close()
        raise DownloadError(f"Google Drive file {file_id}: Drive answered with a web page, not "
                            f"the file; download it by hand from {DRIVE_FOLDER_URL}")
    return response


def list_drive_folder(folder_id: str, depth: int = 2) -> dict[str, str]:
    """``{relative path: file id}`` of a public Drive folder and its sub-folders."""
    with open_url(f"https://drive.google.com/embeddedfolderview?id={folder_id}") as response:
        page = response.read().decode("utf-8", "replace")
    found = {}
    for entry in page.split('class="flip-entry"')[1:]:
        link = re.search(r'href="https://drive\.google\.com/(drive/folders|file/d)/([\w-]+)', entry)
        title = re.search(r'class="flip-entry-title"[^>]*>([^<]*)<', entry)
        if not (link and title):
            continue
        name = html.unescape(title.group(1)).strip()
        if link.group(1) == "file/d":
            found[name] = link.group(2)
        elif depth > 0:
            found.update({f"{name}/{path}": file_id
                          for path, file_id in list_drive_folder(link.group(2), depth - 1).items()})
    return found


def drive_file_id(listing: dict[str, str], lab_file: LabFile) -> str:
    """The id of ``lab_file`` in the listing: same folder and name (cl/valid.h5), else same name."""
    wanted = Path(lab_file.dest)
    in_folder = f"{wanted.parent.name}/{wanted.name}"
    for path, file_id in listing.items():
        if path == in_folder or path.endswith("/" + in_folder):
            return file_id
    matches = [file_id for path, file_id in listing.items() if path.split("/")[-1] == wanted.name]
    if len(matches) != 1:
        raise DownloadError(f"{lab_file.drive_name}: {len(matches)} files of that name in "
                            f"{DRIVE_FOLDER_URL}; download it by hand to {lab_file.dest}")
    return matches[0]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def problem(path: Path, lab_file: LabFile) -> str | None:
    """Why ``path`` is not a good copy of ``lab_file`` (None when it is)."""
    size = path.stat().st_size
    if lab_file.size is not None and size != lab_file.size:
        return f"{size} bytes, expected {lab_file.size}"
    if lab_file.sha256 is not None and sha256(path) != lab_file.sha256:
        return f"sha256 differs from the lab's {lab_file.sha256[:12]}..."
    with open(path, "rb") as handle:
        if handle.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
            return "not an HDF5 file (an error page saved instead of the file?)"
    return None


def save(response, target: Path, lab_file: LabFile) -> None:
    """Stream ``response`` to ``target.partial``, check it, then rename it to ``target``."""
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = response.headers.get("Content-Length")
    try:
        with response, open(partial, "wb") as out:
            for block in iter(lambda: response.read(BLOCK), b""):
                out.write(block)
    except BaseException as error:  # Ctrl-C too
        partial.unlink(missing_ok=True)  # half a file: on a full disk, it would keep the space
        if getattr(error, "errno", None) in DISK_ERRNOS:  # writing failed, not the network
            raise DownloadError(f"{target.parent}: {error.strerror} while writing {target.name}; "
                                "free space there (or give another --dest) and run again") from None
        if isinstance(error, (OSError, http.client.HTTPException)):
            raise DownloadError(f"{lab_file.dest}: download interrupted ({error}); run again") from None
        raise
    got = partial.stat().st_size
    if expected is not None and got != int(expected):
        partial.unlink()
        raise DownloadError(f"{lab_file.dest}: got {got} of {expected} bytes; run again")
    bad = problem(partial, lab_file)
    if bad:
        partial.unlink()
        raise DownloadError(f"{lab_file.dest}: the download is {bad}; run again later")
    os.replace(partial, target)


def check_dest(dest: Path) -> None:
    """Refuse a DEST that cannot hold the files before any network is used: otherwise the
    first fetch fails there, and offline the error would blame the connection. Its nearest
    existing part must be a folder this user can write in (the rest is created)."""
    existing = dest
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    name = f"--dest {dest}" if existing == dest else f"--dest {dest}: {existing}"
    if existing.is_symlink() and not existing.exists():
        raise DownloadError(f"{name} is a link to {os.readlink(existing)}, which does not exist; "
                            "create that folder or give another --dest")
    if not existing.is_dir():
        raise DownloadError(f"{name} is a file, not a folder; give a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DownloadError(f"--dest {dest}: cannot write in {existing}; give a folder you can write to")


def fetch_all(dest: Path, files=LAB_FILES, dry_run: bool = False, log=print) -> None:
    """Fetch every missing or bad file of ``files`` into ``dest``."""
    listing = None
    for lab_file in files:
        target = dest / lab_file.dest
        source = lab_file.url or f"{lab_file.drive_name} in {DRIVE_FOLDER_URL}"
        if target.is_file() and problem(target, lab_file) is None:
            log(f"{target}: already there")
            continue
        if dry_run:
            check = f" (sha256 {lab_file.sha256})" if lab_file.sha256 else ""
            log(f"would fetch {source} -> {target}{check}")
            continue
        log(f"fetching {source} -> {target}")
        if lab_file.url:
            response = open_url(lab_file.url)
        else:
            if listing is None:
                listing = list_drive_folder(DRIVE_FOLDER)
                if not listing:
                    raise DownloadError(f"{DRIVE_FOLDER_URL} lists no files; is it still public? "
                                        "Download the data by hand from it")
            response = open_drive_file(drive_file_id(listing, lab_file))
        save(response, target, lab_file)


def main(argv=None) -> int:
    summary, usage = __doc__.split("\n\n", 1)
    parser = Parser(prog="python scripts/download_lab.py", description=summary, epilog=usage,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default="lab", help="folder to fill (default: lab/)")
    parser.add_argument("--only", choices=("models", "data"), help="fetch just the models or the data")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched (files already in place are checked); no network")
    try:
        args = parser.parse_args(argv)
        files = [f for f in LAB_FILES if args.only is None or f.dest.startswith(args.only + "/")]
        check_dest(Path(args.dest))
        fetch_all(Path(args.dest), files, dry_run=args.dry_run)
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the destination cannot be written
        print(f"error: {error.filename or args.dest}: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun to resume (finished files are kept)", file=sys.stderr)
        return 130
    if not args.dry_run:
        print(f"done: .venv/bin/python -m jobs.sweep --model {Path(args.dest) / 'models/bd_net.h5'} "
              f"--data {Path(args.dest) / 'data'} --single-node --out results/lab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
