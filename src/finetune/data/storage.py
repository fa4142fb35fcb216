"""Where converted data sets live: a local folder or an `s3://` URI, read and written the same way.

Credentials and endpoint come from the usual AWS environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...). Every storage failure is one `FinetuneError` line
naming the URI and the fix. Used by `data=streaming` (reading) and `python -m finetune.cli.optimize`
(writing); LitData moves the chunks itself, with the patch of `allow_plain_http_endpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

# The command that writes a converted data set (named by errors about a missing one).
CONVERT = "python -m finetune.cli.optimize data=<source> output={uri}"


def is_remote(uri: str) -> bool:
    return "://" in uri


def join(base: str, *names: str) -> str:
    """`base`/`names` for a local folder or a URI (URIs always use '/')."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *names])
    return str(Path(base, *names))


def normalise_dir(uri: str) -> str:
    """An absolute local path (workers and ranks may run elsewhere), or the URI without a trailing '/'."""
    return uri.rstrip("/") if is_remote(uri) else str(Path(uri).expanduser().resolve())


def allow_plain_http_endpoint() -> None:
    """LitData moves chunks with obstore, which refuses an http:// endpoint (a local MinIO, moto)
    that boto3 accepts: LitData passes obstore fixed client options without `allow_http` (litdata
    0.2.76), so obstore ignores AWS_ALLOW_HTTP too. An explicit http:// AWS_ENDPOINT_URL is the
    user's choice: the option is added to LitData's options here, in every process that imports
    this module (spawned loader workers do when they unpickle the data set)."""
    if not os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        return
    os.environ.setdefault("AWS_ALLOW_HTTP", "true")
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options["allow_http"] = True


def _s3_client() -> Any:
    """boto3's S3 client as the AWS variables configure it (AWS_ENDPOINT_URL included), failing
    fast on an unreachable endpoint instead of retrying for minutes."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=5, read_timeout=60,
                                            retries={"max_attempts": 2, "mode": "standard"}))


def _bucket_key(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise FinetuneError(f"{uri}: only local folders and s3:// URIs are supported; use s3://BUCKET/PREFIX")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


@contextmanager
def storage_errors(uri: str, missing: str) -> Iterator[None]:
    """Storage failures as one FinetuneError line naming `uri` and the fix; `missing`: what to say
    when the object is not there."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    try:
        yield
    except FileNotFoundError:
        raise FinetuneError(missing) from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as e:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"
        raise FinetuneError(f"cannot reach {endpoint} for {uri} ({type(e).__name__}); check AWS_ENDPOINT_URL "
                            "(unset it for AWS itself) and that the server is up") from None
    except NoCredentialsError:
        raise FinetuneError(f"no AWS credentials to read {uri}; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            raise FinetuneError(f"the bucket of {uri} does not exist; create it and upload the data "
                                f"({CONVERT.format(uri=uri.rsplit('/', 1)[0])}), or fix the URI") from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FinetuneError(missing) from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken",
                    "InvalidToken"):
            raise FinetuneError(f"S3 refused access to {uri} ({code}); check AWS_ACCESS_KEY_ID, "
                                "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN") from None
        raise FinetuneError(f"S3 error {code or e} for {uri}; check the URI and the AWS variables") from None


def read_bytes(uri: str, missing: str) -> bytes:
    """The file at a local path or an s3:// URI."""
    with storage_errors(uri, missing):
        if not is_remote(uri):
            return Path(uri).read_bytes()
        bucket, key = _bucket_key(uri)
        return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file at a local path (temp name, then renamed) or an s3:// URI (one PUT: atomic)."""
    with storage_errors(uri, f"cannot write {uri}; check the URI"):
        if not is_remote(uri):
            path = Path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        bucket, key = _bucket_key(uri)
        _s3_client().put_object(Bucket=bucket, Key=key, Body=data)


def exists(uri: str) -> bool:
    """Whether the file at `uri` is there (storage errors other than "not found" are raised)."""
    try:
        read_bytes(uri, "missing")
    except FinetuneError as e:
        if str(e) == "missing":
            return False
        raise
    return True


# In every process that imports this module: spawned loader workers do when they unpickle a data set.
allow_plain_http_endpoint()
