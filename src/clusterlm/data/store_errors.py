"""What a remote store's client raises, sorted into what a run waits out (the store does not
answer) and what one line must tell the user to fix (credentials, access, a missing bucket).

Besides ``OSError``s, the S3 driver (s3fs on botocore) raises botocore's own errors when the
endpoint does not answer or no credentials are found; they are looked up only once botocore is
loaded (before that none can have been raised), so nothing here needs the ``s3`` extra.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from fsspec import AbstractFileSystem

from clusterlm.data.storage import is_local, url_to_fs
from clusterlm.errors import UserError
from clusterlm.files import check_output_path


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """The errors of a store that does not answer (now): worth retrying."""
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is None:
        return (OSError,)
    return (OSError, botocore.ConnectionError, botocore.HTTPClientError)


def credential_errors() -> tuple[type[BaseException], ...]:
    """The errors of a client that found no (complete) credentials to sign with."""
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is None:
        return ()
    return (botocore.NoCredentialsError, botocore.PartialCredentialsError)


def store_failures() -> tuple[type[BaseException], ...]:
    """Every error of a store that does not answer or refuses."""
    return (*unreachable_errors(), *credential_errors())


def credentials_hint(url: str) -> str:
    if url.startswith(("s3://", "s3a://")):
        return (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile in ~/.aws/credentials, "
            "chosen with AWS_PROFILE) to a key pair of the store"
        )
    return "check the store's credentials"


def refusal(what: str, url: str, err: BaseException) -> UserError | None:
    """The one line for an error of the store of ``url`` that no retry mends (no credentials,
    access refused), or None for another error."""
    if isinstance(err, credential_errors()):
        return UserError(f"{what} failed: no credentials found ({err}); {credentials_hint(url)}")
    if isinstance(err, PermissionError):
        reason = str(err) if err.args and err.args[0] else "forbidden"
        return UserError(
            f"{what} failed: the store refused access ({reason}); {credentials_hint(url)}"
        )
    return None


@contextmanager
def store_errors(what: str, fs: AbstractFileSystem, url: str) -> Iterator[None]:
    """Errors of the remote store behind ``url`` while ``what`` runs, as one line naming the fix
    (local files' errors pass as they are)."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if is_local(fs):
            raise
        if (mapped := refusal(what, url, err)) is not None:
            raise mapped from None
        if isinstance(err, unreachable_errors()) and not isinstance(err, FileNotFoundError):
            endpoint = " (AWS_ENDPOINT_URL)" if url.startswith(("s3://", "s3a://")) else ""
            raise UserError(
                f"{what} failed: the store does not answer ({type(err).__name__}: "
                f"{err}); check its address{endpoint} and that it is up"
            ) from None
        raise


def check_bucket(fs: AbstractFileSystem, root: str, url: str) -> None:
    """For an object store (its paths begin with a bucket): that the bucket of ``root`` exists
    and the credentials open it (``exists`` would answer False to any error)."""
    split_path = getattr(fs, "split_path", None)
    if split_path is None:
        return
    bucket = split_path(root)[0]
    try:
        with store_errors(f"opening bucket {bucket} of {url}", fs, url):
            fs.info(bucket)
    except FileNotFoundError:
        raise UserError(
            f"bucket {bucket} of {url} does not exist on the store; create it "
            f"(e.g. `aws s3 mb s3://{bucket}`) or name an existing one"
        ) from None


def output_location(out: str) -> tuple[AbstractFileSystem, str]:
    """Where ``--out`` writes: its filesystem and path, checked before anything is read or
    written (a local path's place; an object store's bucket, and credentials that open it)."""
    fs, root = url_to_fs(out)
    if is_local(fs):
        check_output_path(root, "--out")
    check_bucket(fs, root, out)
    return fs, root
