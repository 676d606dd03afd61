"""``GET /audio/<id>.wav?u=<user>&s=<mac>``: a reply's audio, for its owner only.

The URL is signed for one user (:func:`server.auth.sign_audio_url`) and the request
must carry that user's login: no session is 401, anything else that does not match
(another user's URL, a guessed or altered one) is the same 404 as a missing file.
Any worker can serve it: the files are on disk and the signing key is shared.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from ..states import services
from .auth import audio_url_valid, authenticate


async def audio_route(request: Request) -> Response:
    user = await authenticate(request.headers, request.client.host if request.client else None)
    if user is None:
        return Response("log in first", status_code=401)
    audio_id = request.path_params.get("id", "")
    if not audio_url_valid(audio_id, user.id, request.query_params.get("u"), request.query_params.get("s")):
        return Response("not found", status_code=404)
    path = await services.audio_store().locate(audio_id)  # any worker: a shared store fetches it
    if path is None:
        return Response("not found", status_code=404)
    return FileResponse(path, media_type="audio/wav", headers={"Cache-Control": "private, max-age=86400"})
