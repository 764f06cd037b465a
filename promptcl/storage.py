"""Where a run or study writes (output, feature cache, Ray storage, runs directory): checked before
any work starts, without creating anything."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Optional


def check_writable_location(what: str, location: str | Path) -> None:
    """Raise ValueError (one line) unless ``location`` can be, or already is, a directory this
    process may write: a local path whose nearest existing ancestor is a writable directory, or a
    URI of a file system pyarrow knows (s3://, gs://, ...; whether it is reachable is not checked here)."""
    text = str(location)
    if "://" in text:
        if text.split("://", 1)[0].lower() in KNOWN_SCHEMES:  # opening one may first ask the network (a region)
            return
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(text)
        except OSError:  # a file system this machine cannot reach now (credentials, network): the workers may
            pass
        except (pyarrow.ArrowException, ValueError) as err:  # an unknown scheme or a malformed URI
            detail = " ".join(str(err).split())
            raise ValueError(f"{what} {text!r} is not a location pyarrow can open ({detail})") from None
        return
    path = Path(text).absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as err:  # e.g. an ancestor that may not be searched
        raise ValueError(f"{what} {text!r} cannot be checked ({err})") from None
    if not existing.is_dir():
        where = "exists" if existing == path else f"lies under {str(existing)!r}, which exists"
        raise ValueError(f"{what} {text!r} {where} and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {text!r}: {str(existing)!r} is not writable")


def check_writable_file(what: str, path: str | Path) -> None:
    """Raise ValueError (one line) unless ``path`` names a file this process can write: not a
    directory, in a directory that is, or can be made, writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory")
    check_writable_location(f"{what} {str(path)!r}: its directory", path.parent)


def default_mode(*, directory: bool) -> int:
    """The permissions ``mkdir`` or ``open`` would give a new directory or file under this process's
    umask (``mkdtemp`` and ``mkstemp`` make theirs private, which a published output must not stay)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


# pyarrow's file systems (and Ray's storage paths): taken as they are
KNOWN_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def without_password(url: str) -> str:
    """``url`` with its password, if it has one, shown as ``***`` (for messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.netloc.rsplit("@", 1)[0].split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{parts.netloc.rsplit('@', 1)[1]}"))


def sqlite_file(url: str) -> Optional[Path]:
    """The database file of an SQLAlchemy ``sqlite:`` URL (MLflow's and Optuna's default stores), else None."""
    if not url.lower().startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except ArgumentError:
        raise ValueError(f"{url!r} is not a database URL (e.g. sqlite:///mlflow.db)") from None
    return Path(database) if database and database != ":memory:" else None


def check_database_url(what: str, url: str) -> None:
    """A SQLAlchemy database URL (an Optuna or MLflow store) whose dialect and Python driver this
    process can load; the database itself is not opened (an ``sqlite:`` file's header is read)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"{what} {url!r} is not a database URL (e.g. sqlite:///path/to/file.db, "
                         "postgresql://host/db)") from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ValueError(f"{what} {url!r} names a database SQLAlchemy does not know ({parsed.drivername!r}; "
                         "e.g. sqlite, postgresql, mysql)") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:  # the dialect's driver package is not installed here
        raise ValueError(f"{what} {url!r} needs the Python module {err.name or str(err)!r} (SQLAlchemy's "
                         f"{parsed.get_backend_name()}+{dialect.driver} driver), which is not installed") from None
    path = sqlite_file(url)
    if path is not None:
        _check_sqlite_file(what, url, path)


def _check_sqlite_file(what: str, url: str, path: Path) -> None:
    """An ``sqlite:`` store must be an SQLite file (or empty, or absent in a directory this process can
    make and write): not a text file, a directory, or a path under a file."""
    if not path.exists():
        check_writable_location(f"{what} {url!r}: its directory", path.parent)
        return
    if path.is_dir():
        raise ValueError(f"{what} {url!r}: {str(path)!r} is a directory, not an SQLite database")
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise ValueError(f"{what} {url!r}: {str(path)!r} cannot be read ({err.strerror})") from None
    if header and header != SQLITE_HEADER:
        raise ValueError(f"{what} {url!r}: {str(path)!r} is not an SQLite database")
    # SQLite writes the file and, beside it, its journal
    unwritable = next((p for p in (path, path.parent) if not os.access(p, os.W_OK)), None)
    if unwritable is not None:
        raise ValueError(f"{what} {url!r}: {str(unwritable)!r} is not writable")


def make_sqlite_parent(url: str) -> None:
    """SQLite creates a missing database file, not its directory."""
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
