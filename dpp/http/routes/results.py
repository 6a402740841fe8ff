"""``GET /v1/results/{token}``: a local results store's downloads (SPEC §5).

No API key: the signed, expiring token is the credential (``ApiGate``
lets this path through). A bad or expired token is 403, a result deleted by
retention 404, an unreadable disk 503 — never 500. One byte range is served
(206, to resume a download, as S3's presigned links do; ``dpp.http.ranges``),
a range past the end is 416.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dpp.context import AppContext
from dpp.http.endpoints import Endpoint, Parameter, Reply, problem
from dpp.http.problems import Problem
from dpp.http.ranges import Unsatisfiable, requested_range
from dpp.runs.downloads import DownloadGone, DownloadRefused, DownloadUnavailable

RESULTS_PREFIX = "/v1/results/"
TOKEN = Parameter(
    "token", "path", {"type": "string"}, "The signed token of a result link.", required=True
)
RANGE = Parameter(
    "Range",
    "header",
    {"type": "string", "examples": ["bytes=1048576-"]},
    "One byte range (RFC 9110 §14.2), e.g. to resume a download: answered 206 with "
    "that part. Several ranges, another unit or a malformed value get the whole result.",
)
IF_RANGE = Parameter(
    "If-Range",
    "header",
    {"type": "string"},
    "The ETag of the copy being resumed: when the result is another one, the whole "
    "result is sent (200) instead of the range.",
)


async def download_result(request: Request) -> Response:
    context: AppContext = request.app.state.context
    try:
        download = await context.downloads.fetch(request.path_params["token"])
    except DownloadRefused as refused:
        detail = "This result link has expired." if refused.expired else "Invalid result link."
        raise Problem(
            403, "result-link-invalid", detail + " Get a fresh one from GET /v1/runs/{run_id}."
        ) from None
    except DownloadGone:
        raise Problem(404, "not-found", "This result no longer exists.") from None
    except DownloadUnavailable:
        raise Problem(
            503,
            "unavailable",
            "The result could not be read now; retry.",
            headers={"Retry-After": "1"},
        ) from None
    etag = f'"{download.sha256}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Cache-Control": "private, no-cache",
        # served from the API's own origin: never sniffed or run as a page
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    wanted = requested_range(
        request.headers.get("range"),
        request.headers.get("if-range"),
        download.size,
        etag if download.sha256 else None,  # no digest, no validator to resume against
    )
    if isinstance(wanted, Unsatisfiable):
        download.close()
        raise Problem(
            416,
            "range-not-satisfiable",
            f"No byte of this result ({download.size} bytes) is in the requested range.",
            headers={"Content-Range": wanted.content_range, **headers},
        )
    if wanted is None:
        status, first, length = 200, 0, download.size
    else:
        status, first, length = 206, wanted.first, wanted.length
        headers["Content-Range"] = wanted.content_range
    # streamed: one chunk in memory at a time, however large the result
    return StreamingResponse(
        download.stream(first, length),
        status,
        headers={"Content-Length": str(length), **headers},
        media_type=download.content_type,
    )


ENDPOINTS = (
    Endpoint(
        "GET",
        "/v1/results/{token}",
        download_result,
        "downloadResult",
        "Download a run's result (a local results store's signed link)",
        "runs",
        None,
        (
            Reply(200, "The stored result, with its content type.", media_type="*/*"),
            Reply(206, "The byte range asked for.", None, ("Content-Range",), "*/*"),
            problem(403, "A tampered, malformed or expired link."),
            problem(404, "The result was deleted (retention), or results are kept in S3."),
            problem(416, "The range starts past the result's end.", "Content-Range"),
            problem(503, "The result could not be read now.", "Retry-After"),
        ),
        parameters=(TOKEN, RANGE, IF_RANGE),
        description=(
            "The run object's `result.download_url` when results are kept on local disk "
            "(DPP_RESULTS_DIR). The link is signed and expires like a presigned URL; "
            "no API key is needed."
        ),
    ),
)
