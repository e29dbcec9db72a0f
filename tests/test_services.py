"""The private-server harness of tests/services.py (and Valkey in tests/servers.py).

Each server is started, asked a real question with its own CLI or protocol,
killed, restarted on the same port, asked again, and closed; nothing of it may
be left running afterwards. RabbitMQ takes seconds to boot, so it starts once
for this module.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
from collections.abc import Callable, Iterator

import pytest

from tests.servers import RedisCluster, RedisSentinel, RedisServer, valkey_binary
from tests.services import (
    MariaDBServer,
    MemcachedCluster,
    MemcachedServer,
    NatsServer,
    PostgresServer,
    Proc,
    RabbitMQServer,
    alive,
    amqp_handshake,
    mariadb_ready,
    memcached_command,
    nats_info,
    postgres_ready,
)

AS_ROOT = os.geteuid() == 0


def owner(pid: int | None) -> str:
    """The account a process runs as."""
    assert pid is not None
    return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_gone(procs: list[Proc], port: int) -> None:
    assert procs
    assert alive(procs) == []
    assert not listening(port)


def assert_mute(probe: Callable[[], object]) -> None:
    """A frozen server's kernel accepts the connection, but nothing answers."""
    with pytest.raises(TimeoutError):
        probe()


def test_postgres() -> None:
    with PostgresServer() as pg:
        assert pg.start_seconds is not None and pg.prepare_seconds is not None
        if AS_ROOT:
            assert owner(pg.pid) == "postgres"
            assert os.stat(pg.data).st_uid == pwd.getpwnam("postgres").pw_uid
        assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        assert pg.execute("SELECT 1") == "1\n"

        assert pg.create_database("t_pg").endswith(f":{pg.port}/t_pg")
        pg.execute(
            "CREATE TABLE items (id int PRIMARY KEY);"
            "CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$",
            database="t_pg",
        )
        url = pg.create_role("writer", "p@ss'w", database="t_pg")
        assert url == f"postgresql://writer:p%40ss%27w@127.0.0.1:{pg.port}/t_pg"
        pg.execute("INSERT INTO items VALUES (1)", database="t_pg", user="writer")
        assert pg.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'writer'") == "f\n"
        with pytest.raises(RuntimeError, match="permission denied for table items"):
            pg.execute(
                "CREATE TRIGGER t AFTER INSERT ON items FOR EACH ROW EXECUTE FUNCTION noop()",
                database="t_pg",
                user="writer",
            )

        port, before = pg.port, pg.processes()
        assert len(before) > 1  # the postmaster and its own-session children
        pg.freeze()
        assert_mute(lambda: postgres_ready(port, timeout=0.3))
        pg.thaw()
        assert postgres_ready(port)

        pg.kill()
        assert_gone(before, port)
        pg.start()
        assert pg.port == port
        assert pg.execute("SELECT count(*) FROM items", database="t_pg") == "1\n"
        procs = pg.processes()
    assert_gone(procs, port)
    assert not pg.directory.exists()
    pg.close()  # idempotent


def test_mariadb() -> None:
    with MariaDBServer() as db:
        if AS_ROOT:
            assert owner(db.pid) == "mysql"
            assert os.stat(db.data).st_uid == pwd.getpwnam("mysql").pw_uid
        assert db.execute("SELECT 1") == "1\n"
        assert db.execute("SELECT @@character_set_server, @@collation_server") == (
            "utf8mb4\tutf8mb4_unicode_ci\n"
        )
        assert db.create_database("t_my") == f"mysql://root@127.0.0.1:{db.port}/t_my"
        db.execute("CREATE TABLE items (id INT PRIMARY KEY)", database="t_my")
        db.create_user("writer", "pw", database="t_my")
        db.execute("INSERT INTO items VALUES (1)", database="t_my")

        port, before = db.port, db.processes()
        db.freeze()
        assert_mute(lambda: mariadb_ready(port, timeout=0.3))
        db.thaw()

        db.kill()
        assert_gone(before, port)
        db.start()
        assert db.port == port
        assert db.execute("SELECT count(*) FROM items", database="t_my") == "1\n"
        procs = db.processes()
    assert_gone(procs, port)
    assert not db.directory.exists()


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[RabbitMQServer]:
    with RabbitMQServer() as server:
        yield server


def test_rabbitmq(rabbitmq: RabbitMQServer) -> None:
    port = rabbitmq.port
    if AS_ROOT:
        assert owner(rabbitmq.pid) == "rabbitmq"
    assert rabbitmq.url == f"amqp://guest:guest@127.0.0.1:{port}//"
    assert amqp_handshake(port)
    assert rabbitmq.list_queues() == []
    rabbitmq.close_all_connections()

    before = rabbitmq.processes()
    assert len(before) > 1  # the start script and the Erlang VM
    rabbitmq.freeze()
    assert_mute(lambda: amqp_handshake(port, timeout=0.3))
    rabbitmq.thaw()

    rabbitmq.kill()
    assert_gone(before, port)
    rabbitmq.start()
    assert rabbitmq.port == port
    assert amqp_handshake(port)
    assert rabbitmq.list_connections() == []


def test_rabbitmq_close(rabbitmq: RabbitMQServer) -> None:
    """Runs last in this module: closing the shared node leaves nothing behind."""
    procs = rabbitmq.processes()
    rabbitmq.close()
    assert_gone(procs, rabbitmq.port)
    assert not rabbitmq.directory.exists()


def test_memcached() -> None:
    with MemcachedServer() as mc:
        if AS_ROOT:
            assert owner(mc.pid) == "nobody"
        address = ("127.0.0.1", mc.port)
        assert mc.url == f"memcached://127.0.0.1:{mc.port}/"
        assert memcached_command(address, "version").startswith(b"VERSION 1.")
        assert memcached_command(address, "set k 0 0 1\r\nv") == b"STORED\r\n"
        mc.flush_all()
        assert memcached_command(address, "get k") == b"END\r\n"

        port, before = mc.port, mc.processes()
        mc.freeze()
        assert_mute(lambda: memcached_command(address, "version", timeout=0.3))
        mc.thaw()
        mc.kill()
        assert_gone(before, port)
        mc.start()
        assert mc.port == port
        assert mc.version().startswith("VERSION ")
        procs = mc.processes()
    assert_gone(procs, port)


def test_memcached_cluster() -> None:
    with MemcachedCluster(3) as cluster:
        ports = [node.port for node in cluster]
        assert len(set(ports)) == 3
        assert cluster.url == "memcached://" + ";".join(f"127.0.0.1:{p}" for p in ports) + "/"
        assert all(node.version().startswith("VERSION ") for node in cluster)
        cluster.flush_all()
        procs = [proc for node in cluster for proc in node.processes()]
    assert alive(procs) == []


def _streams(nats: NatsServer) -> list[str]:
    names: list[str] = json.loads(nats.request("$JS.API.STREAM.NAMES"))["streams"] or []
    return names


def test_nats() -> None:
    with NatsServer() as nats:
        port = nats.port
        info = nats_info(port)
        assert info["jetstream"] is True and info["port"] == port
        config = {"name": "KV_results", "subjects": ["$KV.results.>"], "storage": "file"}
        created = json.loads(
            nats.request("$JS.API.STREAM.CREATE.KV_results", json.dumps(config).encode())
        )
        assert created["config"]["name"] == "KV_results", created

        before = nats.processes()
        nats.freeze()
        assert_mute(lambda: nats_info(port, timeout=0.3))
        nats.thaw()
        nats.kill()
        assert_gone(before, port)
        nats.start()
        assert nats.port == port
        assert _streams(nats) == ["KV_results"]  # the store survived the restart

        nats.restart(wipe=True)
        assert nats.port == port
        assert _streams(nats) == []
        procs = nats.processes()
    assert_gone(procs, port)


def test_valkey() -> None:
    binary = valkey_binary()
    with RedisServer(binary=binary) as server:
        assert b"valkey_version:" in server.command("INFO", "server")
        port = server.port
        server.restart()
        assert server.port == port
        assert server.command("PING").startswith(b"+PONG")
    with RedisSentinel(binary=binary) as sentinel:
        assert sentinel.master.binary == binary
        assert b"valkey_version:" in sentinel.master.command("INFO", "server")
    with RedisCluster(binary=binary) as cluster:
        assert all(b"valkey_version:" in n.command("INFO", "server") for n in cluster.nodes)
