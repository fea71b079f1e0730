"""ASGI entry point: the web program runs this under uvicorn.

Django's handler serves HTTP only, so the ASGI lifespan protocol is answered
here: on shutdown the process's state broker (``workers.live.broker``) stops and
closes its database connection before the server exits, instead of dying with
the interpreter in the middle of a read.
"""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_application = get_asgi_application()


async def _lifespan(receive, send) -> None:
    from asgiref.sync import sync_to_async

    from workers.live.broker import stop_broker

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await sync_to_async(stop_broker, thread_sensitive=False)()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await django_application(scope, receive, send)
