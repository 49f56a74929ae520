"""The errors of a remote store's client sorted into waits and one-line fixes; botocore's own
errors (the S3 driver's) included."""

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from clusterlm.data.shard_cache import with_retries
from clusterlm.data.storage import url_to_fs
from clusterlm.data.store_errors import check_bucket, store_errors
from clusterlm.errors import UserError

S3 = pytest.importorskip("s3fs").S3FileSystem  # the s3 extra
botocore = pytest.importorskip("botocore.exceptions")
EndpointConnectionError = botocore.EndpointConnectionError
NoCredentialsError, ReadTimeoutError = botocore.NoCredentialsError, botocore.ReadTimeoutError


def raise_(err: BaseException):
    def action(*args):
        raise err

    return action


def test_botocore_connection_errors_are_retried_then_one_line():
    delays: list[float] = []
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    with pytest.raises(UserError, match=r"data.retry_s = 1 s \(EndpointConnectionError") as err:
        with_retries(raise_(unreachable), "reading shard s", 1.0, delays.append, "s3://b/s")
    assert delays[:2] == [0.05, 0.1] and "\n" not in str(err.value)
    timeout = ReadTimeoutError(endpoint_url="http://127.0.0.1:9")
    with pytest.raises(UserError, match="ReadTimeoutError"):
        with_retries(raise_(timeout), "reading shard s", 0.1, lambda _: None, "s3://b/s")


def test_missing_credentials_are_not_retried_and_name_the_variables():
    with pytest.raises(UserError, match="no credentials found .*AWS_ACCESS_KEY_ID"):
        with_retries(raise_(NoCredentialsError()), "reading shard s", 60, pytest.fail, "s3://b/s")


@pytest.mark.parametrize(
    "error, words",
    [
        (PermissionError("Forbidden"), r"refused access \(Forbidden\); set AWS_ACCESS_KEY_ID"),
        (NoCredentialsError(), "no credentials found"),
        (EndpointConnectionError(endpoint_url="http://h"), "does not answer .*AWS_ENDPOINT_URL"),
    ],
)
def test_store_errors_are_one_line_naming_the_fix(error, words):
    with pytest.raises(UserError, match=words) as err:
        with store_errors("reading s3://b/d", S3(anon=True), "s3://b/d"):
            raise error
    assert "\n" not in str(err.value)


def test_local_errors_and_missing_objects_pass_unchanged():
    with pytest.raises(PermissionError):
        with store_errors("reading d", LocalFileSystem(), "d"):
            raise PermissionError("read-only")
    with pytest.raises(FileNotFoundError):
        with store_errors("reading s3://b/d", S3(anon=True), "s3://b/d"):
            raise FileNotFoundError("gone")


def test_a_missing_bucket_is_one_line(monkeypatch):
    fs = S3(anon=True)
    monkeypatch.setattr(fs, "info", raise_(FileNotFoundError("Not Found")))
    with pytest.raises(
        UserError, match=r"bucket nope of s3://nope/x does not exist .*mb s3://nope"
    ):
        check_bucket(fs, "nope/x", "s3://nope/x")
    check_bucket(MemoryFileSystem(), "/nope/x", "memory://nope/x")  # no buckets: nothing to check


def test_a_driver_not_installed_names_what_to_install():
    fsspec.register_implementation("nodriver", "no_such_module.NoFileSystem", clobber=True)
    with pytest.raises(UserError, match=r"nodriver://b/x needs a storage driver .*clusterlm\[s3\]"):
        url_to_fs("nodriver://b/x")
