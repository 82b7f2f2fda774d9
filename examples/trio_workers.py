"""A trio program on SQLAlchemy's asyncio extension, with a sync driver.

    python examples/trio_workers.py [DATABASE_FILE]

Async drivers (aiosqlite, asyncpg) are asyncio-only; under trio the shim
runs plain sync DBAPI drivers -- here sqlite3 on a file -- in its worker
threads (``install(sync_drivers=True)``), so a blocked driver call blocks a
worker thread, never the trio loop.

A nursery of workers takes jobs from a memory channel.  Each job runs in
its own transaction under ``trio.fail_after``: it reads the job, does the
work, adds a result row and sets the job's status, then "notifies" someone
before committing -- and for two jobs the notification hangs.  The deadline
cancels them at that await point; ``session.begin()`` rolls their
transaction back, so neither their result nor their status reaches the
database, and a fresh transaction marks them timed out.  A monitor task
queries progress until the nursery cancels it, and the whole batch runs
under a ``trio.move_on_after`` budget.  The program checks the database
afterwards and exits non-zero if anything is off.

(The changes wait in the session while a job notifies: flushing them first
would hold SQLite's single write lock across the hanging call, and every
other worker's write would queue behind it -- in its worker thread, so the
loop keeps running, but past its own deadline.)
"""

from __future__ import annotations

import os
import sys
import tempfile

import trio

import sqla_anyio_shim

# before the asyncio extension is imported: without greenlet, importing it
# fails unless the shim is in place
sqla_anyio_shim.install(sync_drivers=True)

from sqlalchemy import ForeignKey, String, func, select  # noqa: E402
from sqlalchemy.ext.asyncio import (  # noqa: E402
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402

JOBS = 24
WORKERS = 4
JOB_DEADLINE = 0.5  # seconds, per job (fail_after)
RUN_BUDGET = 60.0  # seconds, the whole batch (move_on_after)
HANGING = {7, 18}  # jobs whose notification never answers


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    worker: Mapped[str | None] = mapped_column(String(20))


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    value: Mapped[int]


Sessions = async_sessionmaker[AsyncSession]


async def notify(job: Job) -> None:
    """Stands for a call to another service; for HANGING jobs it never answers."""
    await trio.sleep(3600 if job.id in HANGING else 0.01)


async def run_job(sessions: Sessions, job_id: int, name: str) -> None:
    async with sessions() as session, session.begin():
        job = await session.get_one(Job, job_id)
        await trio.sleep(0.01 * (job_id % 5))  # the work
        session.add(Result(job_id=job_id, value=job_id * job_id))
        job.status, job.worker = "done", name
        await notify(job)  # before the commit
    # leaving session.begin() committed -- unless an exception (the deadline's
    # Cancelled) went through it, which rolled the transaction back


async def worker(
    name: str, jobs: trio.MemoryReceiveChannel[int], sessions: Sessions, log: list[str]
) -> None:
    async with jobs:
        async for job_id in jobs:
            started = trio.current_time()
            try:
                with trio.fail_after(JOB_DEADLINE):
                    await run_job(sessions, job_id, name)
            except trio.TooSlowError:
                async with sessions() as session, session.begin():
                    (await session.get_one(Job, job_id)).status = "timed out"
                outcome = "timed out (fail_after): its transaction rolled back"
            else:
                outcome = "done"
            took = trio.current_time() - started
            log.append(f"  {name}  job {job_id:2d}  {took:4.2f} s  {outcome}")
            print(log[-1], flush=True)


async def monitor(sessions: Sessions, polls: list[int]) -> None:
    """Query progress until cancelled by the nursery."""
    while True:
        async with sessions() as session:
            polls.append(
                await session.scalar(
                    select(func.count()).select_from(Job).where(Job.status != "pending")
                )
                or 0
            )
        await trio.sleep(0.05)


async def main(path: str) -> int:
    engine = create_async_engine(f"sqlite:///{path}")  # sqlite3, in the workers
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        async with sessions() as session, session.begin():
            session.add_all(Job(id=i) for i in range(1, JOBS + 1))
        print(
            f"{JOBS} jobs, {WORKERS} workers, each job under trio.fail_after({JOB_DEADLINE}); "
            f"jobs {sorted(HANGING)} hang in notify()",
            flush=True,
        )

        log: list[str] = []
        polls: list[int] = []
        send, receive = trio.open_memory_channel[int](0)
        async with trio.open_nursery() as outer:
            outer.start_soon(monitor, sessions, polls)
            with trio.move_on_after(RUN_BUDGET) as budget:
                async with trio.open_nursery() as workers:
                    async with receive:
                        for n in range(1, WORKERS + 1):
                            workers.start_soon(
                                worker, f"worker-{n}", receive.clone(), sessions, log
                            )
                    async with send:
                        for job_id in range(1, JOBS + 1):
                            await send.send(job_id)
            outer.cancel_scope.cancel()  # the workers are done: stop the monitor
        print(
            f"monitor: cancelled by the nursery after {len(polls)} progress queries "
            f"(last saw {polls[-1] if polls else 0}/{JOBS} finished)"
        )

        async with sessions() as session:
            counts = dict(
                (await session.execute(select(Job.status, func.count()).group_by(Job.status))).all()
            )
            result_jobs = set(await session.scalars(select(Result.job_id)))
        done = counts.get("done", 0)
        timed_out = counts.get("timed out", 0)
        print(
            f"database: {done} done, {timed_out} timed out, {counts.get('pending', 0)} pending; "
            f"{len(result_jobs)} result rows, none from a timed-out job: "
            f"{'yes' if not result_jobs & HANGING else 'NO'}"
        )
        print(
            f"batch within its {RUN_BUDGET:.0f} s budget (move_on_after): "
            f"{'no' if budget.cancelled_caught else 'yes'}"
        )
        greenlet = "greenlet" in sys.modules
        print(f"greenlet imported: {'YES' if greenlet else 'no'}")
        ok = (
            done == JOBS - len(HANGING)
            and timed_out == len(HANGING)
            and result_jobs == set(range(1, JOBS + 1)) - HANGING
            and not budget.cancelled_caught
            and not greenlet
        )
        return 0 if ok else 1
    finally:
        await engine.dispose()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        db = os.path.abspath(sys.argv[1])
    else:
        db = os.path.join(tempfile.mkdtemp(prefix="sqla-anyio-shim-example-"), "jobs.db")
    print(f"trio {trio.__version__} + sqlite3 in the shim's worker threads: {db}")
    sys.exit(trio.run(main, db))
