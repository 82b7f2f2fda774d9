"""A FastAPI application on SQLAlchemy's asyncio extension -- run unmodified
under sqla-anyio-shim, with greenlet not installed.

Serve it (``DATABASE_URL`` picks the database; the default is
``sqlite+aiosqlite:///notes.db`` in the current directory)::

    python -m sqla_anyio_shim run -- uvicorn examples.fastapi_app:app
    DATABASE_URL=postgresql+asyncpg://user@host/db python -m sqla_anyio_shim run -- uvicorn ...

or let it drive itself through httpx and exit (a fresh SQLite file)::

    python -m sqla_anyio_shim run -- examples/fastapi_app.py

Nothing here knows about the shim: this is an ordinary application.  It
shows the two places where SQLAlchemy meets the framework:

* one ``AsyncSession`` per request, injected with ``Depends(get_session)``:
  the endpoint commits, the dependency closes the session after the
  response;
* a background task (``BackgroundTasks``) that writes an audit row after the
  response was sent, with a session of its own -- the request's session is
  closed by then;

and the engine is created and disposed in the application's lifespan.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import String, Text, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_URL = "sqlite+aiosqlite:///notes.db"


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "example_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)


class AuditEntry(Base):
    __tablename__ = "example_audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    note_id: Mapped[int]
    action: Mapped[str] = mapped_column(String(20))
    #: notes in the table when the task ran: the task sees committed data
    notes_seen: Mapped[int]


class NoteIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    body: str = ""


class NoteOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    body: str


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    note_id: int
    action: str
    notes_seen: int


Sessions = async_sessionmaker[AsyncSession]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The per-request session; closed (connection back to the pool) once
    the response is sent."""
    sessions: Sessions = request.app.state.sessions
    async with sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def record(sessions: Sessions, note_id: int, action: str) -> None:
    """Background task: runs after the response, in a session of its own."""
    async with sessions() as session, session.begin():
        seen = await session.scalar(select(func.count()).select_from(Note))
        session.add(AuditEntry(note_id=note_id, action=action, notes_seen=seen or 0))


router = APIRouter()


@router.post("/notes", status_code=201, response_model=NoteOut)
async def create_note(
    data: NoteIn, session: SessionDep, tasks: BackgroundTasks, request: Request
) -> Note:
    note = Note(title=data.title, body=data.body)
    session.add(note)
    await session.commit()
    tasks.add_task(record, request.app.state.sessions, note.id, "created")
    return note


@router.get("/notes", response_model=list[NoteOut])
async def list_notes(session: SessionDep) -> list[Note]:
    return list(await session.scalars(select(Note).order_by(Note.id)))


@router.get("/notes/{note_id}", response_model=NoteOut)
async def get_note(note_id: int, session: SessionDep) -> Note:
    note = await session.get(Note, note_id)
    if note is None:
        raise HTTPException(status_code=404, detail=f"no note {note_id}")
    return note


@router.delete("/notes/{note_id}", status_code=204)
async def delete_note(
    note_id: int, session: SessionDep, tasks: BackgroundTasks, request: Request
) -> Response:
    note = await session.get(Note, note_id)
    if note is None:
        raise HTTPException(status_code=404, detail=f"no note {note_id}")
    await session.delete(note)
    await session.commit()
    tasks.add_task(record, request.app.state.sessions, note_id, "deleted")
    return Response(status_code=204)


@router.get("/audit", response_model=list[AuditOut])
async def audit(session: SessionDep) -> list[AuditEntry]:
    return list(await session.scalars(select(AuditEntry).order_by(AuditEntry.id)))


@router.get("/health")
async def health(request: Request) -> dict[str, object]:
    shim = sys.modules.get("sqla_anyio_shim")
    return {
        "database": request.app.state.engine.url.render_as_string(hide_password=True),
        "sqla_anyio_shim_installed": bool(shim and shim.is_installed()),
        "greenlet_imported": "greenlet" in sys.modules,
    }


def create_app(database_url: str | None = None, **engine_options: Any) -> FastAPI:
    """The application; ``database_url`` defaults to ``$DATABASE_URL``, and
    ``engine_options`` go to ``create_async_engine()``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = database_url or os.environ.get("DATABASE_URL", DEFAULT_URL)
        engine = create_async_engine(url, **engine_options)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        app.state.engine = engine
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(title="notes (sqla-anyio-shim example)", lifespan=lifespan)
    app.include_router(router)
    return app


app = create_app()


async def demo(database_url: str) -> None:
    """Drive the real application through httpx (ASGI transport, lifespan
    included) and print each exchange."""
    import httpx

    application = create_app(database_url)
    transport = httpx.ASGITransport(app=application)
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=transport, base_url="http://notes") as client,
    ):

        async def show(method: str, url: str, **kwargs: object) -> httpx.Response:
            response = await client.request(method, url, **kwargs)  # type: ignore[arg-type]
            body = response.text if len(response.text) <= 160 else response.text[:157] + "..."
            print(f"{method:6} {url:10} -> {response.status_code} {body}".rstrip())
            return response

        await show("POST", "/notes", json={"title": "first", "body": "under the shim"})
        await show("POST", "/notes", json={"title": "second"})
        await show("POST", "/notes", json={"title": ""})
        await show("GET", "/notes")
        await show("DELETE", "/notes/1")
        await show("GET", "/notes/1")
        await show("GET", "/audit")
        await show("GET", "/health")


if __name__ == "__main__":
    import tempfile

    import anyio

    url = os.environ.get("DATABASE_URL")
    if url is None:
        url = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='sqla-anyio-shim-example-')}/notes.db"
    print(f"database: {url}")
    anyio.run(demo, url)
