"""Reading multipart uploads under the configured limits.

The form is parsed by hand (not by FastAPI parameters) so that authentication and model
readiness are checked before any body is read, and so that every limit gets its own
error code. The request body limit itself is enforced by service.middleware.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.errors import ApiError
from service.safe_text import clean_filename

# The multipart parser's own cap on file parts (Starlette's default). Our limit is counted
# on the parsed form below, so it never depends on the wording of the parser's error; the
# request size itself is bounded by MAX_REQUEST_BYTES (service.middleware).
_PARSER_MAX_FILES = 1000


@dataclass
class Upload:
    filename: str | None
    data: bytes | None
    error: ApiError | None = None


async def parse_form(request: Request, max_files: int) -> FormData:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            "missing_file",
            "send the image as multipart/form-data (field 'file' for /predict, "
            "repeated field 'files' for /predict/batch)",
        )
    too_many = ApiError("too_many_files", f"at most {max_files} file(s) per request")
    try:
        form = await request.form(max_files=max(max_files, _PARSER_MAX_FILES), max_fields=100)
    except ClientDisconnect:
        raise ApiError("invalid_multipart", "the client disconnected mid-upload") from None
    except StarletteHTTPException as exc:
        detail = str(exc.detail)
        if detail.startswith("Too many files"):  # only past the parser's cap of 1000
            raise too_many from None
        raise ApiError("invalid_multipart", f"malformed multipart body: {detail}") from None
    files = sum(isinstance(value, UploadFile) for _, value in form.multi_items())
    if files > max_files:
        await form.close()
        raise too_many
    return form


def files_in(form: FormData, field: str) -> list[UploadFile]:
    return [item for item in form.getlist(field) if isinstance(item, UploadFile)]


async def read_upload(upload: UploadFile, max_file_bytes: int) -> Upload:
    """The bytes of one uploaded file, or a file_too_large error (read nothing then).
    The filename is kept only as service.safe_text.clean_filename leaves it."""
    filename = clean_filename(upload.filename)
    too_large = ApiError(
        "file_too_large", f"the file is larger than the limit of {max_file_bytes:,} bytes"
    )
    if upload.size is not None and upload.size > max_file_bytes:
        return Upload(filename, None, too_large)
    data = await upload.read(max_file_bytes + 1)
    if len(data) > max_file_bytes:
        return Upload(filename, None, too_large)
    return Upload(filename, data)
