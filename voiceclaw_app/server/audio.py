"""``GET /audio/<id>.wav``: chunk audio from the data dir (any worker can serve it)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from ..states import services


async def audio_route(request: Request) -> Response:
    audio_id = request.path_params.get("id", "")
    path = await services.audio_store().locate(audio_id)  # any worker: a shared store fetches it
    if path is None:
        return Response("not found", status_code=404)
    return FileResponse(path, media_type="audio/wav", headers={"Cache-Control": "private, max-age=86400"})
