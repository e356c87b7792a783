"""gcp-storage-emulator, with the generation preconditions Cloud Storage has and the emulator ignores:

    python tests/gcs_emulator.py PORT BUCKET

- ``ifGenerationMatch`` on uploads (412 when the object's generation differs; 0: the object must not
  exist): jaxgpt's run lock relies on it, tensorstore's OCDBT manifests too;
- ``ifGenerationMatch`` / ``ifGenerationNotMatch`` on downloads (412 / 304) and the ``x-goog-generation``
  header, from which tensorstore learns what it read (without them a read of a manifest it wrote
  fails at random with "Malformed StorageGeneration").
"""

from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> int:
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _arg(request, key: str) -> str | None:
    value = request.query.get(key)
    return value[0] if value else None


def _failed(response, status: HTTPStatus) -> None:
    response.status = status
    if status == HTTPStatus.PRECONDITION_FAILED:
        response.json({"error": {"code": 412, "message": "At least one of the pre-conditions did not hold."}})


def _download(original):
    def download(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        have = _generation(storage, bucket, name)
        match, not_match = _arg(request, "ifGenerationMatch"), _arg(request, "ifGenerationNotMatch")
        if match is not None and int(match) != have:
            return _failed(response, HTTPStatus.PRECONDITION_FAILED)
        if not_match is not None and have and int(not_match) == have:
            return _failed(response, HTTPStatus.NOT_MODIFIED)
        original(request, response, storage, *args, **kwargs)
        if have:
            response["x-goog-generation"] = str(have)
            response["x-goog-metageneration"] = "1"
    return download


def _insert(original):
    def insert(request, response, storage, *args, **kwargs):
        match, name = _arg(request, "ifGenerationMatch"), _arg(request, "name")
        if match is not None and name is None and isinstance(request.data, dict):  # multipart / resumable
            name = (request.data.get("meta") or request.data).get("name")
        if match is not None and name is not None and int(match) != _generation(
                storage, request.params["bucket_name"], name):
            return _failed(response, HTTPStatus.PRECONDITION_FAILED)
        return original(request, response, storage, *args, **kwargs)
    return insert


def patch() -> None:
    new = {objects.download: _download(objects.download), objects.insert: _insert(objects.insert)}
    objects.download = new[objects.download]  # objects.get calls it by name for ?alt=media
    for _, handlers in server.HANDLERS:
        for method, fn in handlers.items():
            handlers[method] = new.get(fn, fn)


if __name__ == "__main__":
    patch()
    server.Server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
