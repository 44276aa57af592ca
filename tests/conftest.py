"""Fixtures: one real PostgreSQL cluster per session, a fresh database per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.pgcluster import PgCluster, start_cluster

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    cluster = start_cluster()
    yield cluster
    cluster.stop("immediate")


@pytest.fixture
async def db_url(pg: PgCluster) -> AsyncIterator[str]:
    """A fresh database with PGMQ, the stand-ins and the edge_worker migration."""
    name = f"t_{os.getpid()}_{next(_db_counter)}"
    url = await pg.create_database(name)
    yield url
    await pg.drop_database(name)


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db_url)
    yield connection
    await connection.close()
