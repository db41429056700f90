"""Reading multipart uploads under the configured limits, in memory.

The form is parsed by hand (not by FastAPI parameters) so that authentication and model
readiness are checked before any body is read, and so that every limit gets its own
error code. python-multipart's parser is fed the body as it streams in; each file's bytes
go straight into memory, bounded: MAX_FILE_BYTES per file (beyond it the file only counts
as too large), at most `max_files` files and 100 other fields of at most 64 KiB, and the
request itself under MAX_REQUEST_BYTES (service.middleware). Nothing is written to disk:
Starlette's own form parser spools files over 1 MB to a temporary file, which would put
patients' images on the server's disk, and costs a thread hop per write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.errors import ApiError
from service.safe_text import clean_filename

MAX_FIELDS = 100
MAX_FIELD_BYTES = 64 * 1024


@dataclass
class Upload:
    filename: str | None
    data: bytes | None
    error: ApiError | None = None


@dataclass
class _Part:
    name: str | None = None
    filename: bytes | None = None  # None: a text field
    # Views into the body's chunks as they came (python-multipart passes those, or bytes
    # of its own: never a buffer it reuses): the bytes are copied once, by `take`.
    chunks: list[memoryview] = field(default_factory=list)
    size: int = 0
    too_large: bool = False

    def take(self) -> bytes:
        """The part's bytes in one copy; the part lets go of the body's chunks."""
        data = b"".join(self.chunks)
        self.chunks = []
        return data


class UploadForm:
    """The files of one multipart body, by field, in the order they came."""

    def __init__(self, parts: list[_Part], max_file_bytes: int) -> None:
        self._parts = parts
        self._max_file_bytes = max_file_bytes

    def uploads(self, field_name: str) -> list[Upload]:
        """The files sent in `field_name`: their bytes, or a file_too_large error (the
        bytes were not kept). Filenames as service.safe_text.clean_filename leaves them.
        The bytes move out of the form: call it once per field."""
        return [
            self._upload(part)
            for part in self._parts
            if part.filename is not None and part.name == field_name
        ]

    def _upload(self, part: _Part) -> Upload:
        assert part.filename is not None
        filename = clean_filename(part.filename.decode("utf-8", "replace"))
        if part.too_large:
            limit = self._max_file_bytes
            message = f"the file is larger than the limit of {limit:,} bytes"
            return Upload(filename, None, ApiError("file_too_large", message))
        # The form holds no second copy while the image is served.
        return Upload(filename, part.take())


class _FormReader:
    """python-multipart's callbacks, collecting parts under the limits."""

    def __init__(self, boundary: bytes, max_files: int, max_file_bytes: int) -> None:
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.parts: list[_Part] = []
        self.files = 0
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    def _on_part_begin(self) -> None:
        self._part = _Part()
        self._disposition = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition or b"")
        name = options.get(b"name")
        if name is None:
            raise ApiError(
                "invalid_multipart",
                'malformed multipart body: a part has no Content-Disposition "name"',
            )
        self._part.name = name.decode("utf-8", "replace")
        self._part.filename = options.get(b"filename")
        if self._part.filename is not None:
            self.files += 1
            if self.files > self.max_files:
                raise ApiError("too_many_files", f"at most {self.max_files} file(s) per request")
        elif len(self.parts) - self.files + 1 > MAX_FIELDS:
            raise ApiError("invalid_multipart", f"more than {MAX_FIELDS} form fields")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.too_large:
            return
        limit = self.max_file_bytes if part.filename is not None else MAX_FIELD_BYTES
        size = part.size + (end - start)
        if size > limit:
            if part.filename is None:
                raise ApiError(
                    "invalid_multipart", f"a form field is larger than {MAX_FIELD_BYTES:,} bytes"
                )
            part.too_large = True
            part.chunks = []  # its bytes are not kept
            return
        # A view, not a slice: a slice and an append were two copies of every upload on
        # the event loop (with the bytes() in `_upload`, about 8 % of its samples in a
        # soak, py-spy --gil).
        part.chunks.append(memoryview(data)[start:end])
        part.size = size

    def _on_part_end(self) -> None:
        self.parts.append(self._part)


async def parse_form(request: Request, max_files: int, max_file_bytes: int) -> UploadForm:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            "missing_file",
            "send the image as multipart/form-data (field 'file' for /predict, "
            "repeated field 'files' for /predict/batch)",
        )
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(
            "invalid_multipart", "malformed multipart body: the Content-Type has no boundary"
        )
    reader = _FormReader(boundary, max_files, max_file_bytes)
    try:
        async for chunk in request.stream():
            # bytes as ASGI says, so that the parts' views (above) see data that stays.
            reader.parser.write(chunk if type(chunk) is bytes else bytes(chunk))
        reader.parser.finalize()
    except ClientDisconnect:
        raise ApiError("invalid_multipart", "the client disconnected mid-upload") from None
    except FormParserError:
        raise ApiError("invalid_multipart", "malformed multipart body") from None
    return UploadForm(reader.parts, max_file_bytes)
