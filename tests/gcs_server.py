"""A Cloud Storage server on 127.0.0.1 for the tests: gcp-storage-emulator, in memory.

    python tests/gcs_server.py PORT BUCKET   # prints "ready" once it serves PORT, with BUCKET created

Both halves of the path layer are pointed at it with the variables :func:`client_env` returns: gcsfs
(``STORAGE_EMULATOR_HOST``) and tensorstore (``TENSORSTORE_GCS_HTTP_URL``, with a fixed test token).

One addition to the emulator: real Cloud Storage sends an object's generation as ``x-goog-generation``
on every media download, and tensorstore (orbax's array store) refuses a download without it ("Malformed
StorageGeneration"). The emulator leaves it out, so :func:`_with_generation_headers` adds it.
"""

import sys
import time


def client_env(port: int) -> dict[str, str]:
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}


def _with_generation_headers():
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  # not found: the 404 is already set
      return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]

  objects.download = download_with_generation  # before the server module binds its routes


def main(port: int, bucket: str) -> None:
  _with_generation_headers()
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  # The emulator serves one connection at a time: a client that goes quiet mid-request (a test kills
  # training runs at random moments) must not stall it for the others.
  server.RequestHandler.timeout = 10
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).start()
  print("ready", flush=True)
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
