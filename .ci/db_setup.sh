#!/usr/bin/env bash
# Prepare the local PostgreSQL 15 and MariaDB 10.11 servers for the database
# tests (tests/test_databases.py) and for SQLAlchemy's upstream suite run
# with --dburi against them.
#
# Idempotent and non-interactive: safe to run any number of times.
#
#   - starts each server if it does not accept connections;
#   - waits (bounded, DB_SETUP_TIMEOUT seconds, default 60) until it does;
#   - PostgreSQL, db "test": schemas test_schema and test_schema_2, the
#     hstore and citext extensions, English full-text search config, and a
#     login role "root" (the URLs the tests use connect as root);
#   - PostgreSQL and MariaDB: a database shim_tests for the own tests and
#     (PostgreSQL) shim_bench for the benchmarks, apart from the suite's;
#   - MariaDB: databases test, test_schema and test_schema_2 (SQLAlchemy's
#     mysql provisioning treats schemas as databases), utf8mb4.  The suite
#     runs as root (empty password), which has rights on all three.
#
# Without CI=true a server that cannot be started is reported and skipped
# (the database tests then skip themselves).  With CI=true it is an error:
# the script exits non-zero with a message naming the server.
#
# Environment:
#   CI                 "true" makes an unavailable server fatal
#   DB_SETUP_TIMEOUT   seconds to wait for each server (default 60)
#   PGHOST/PGPORT      default 127.0.0.1 / 5432
#   MYSQL_HOST/MYSQL_PORT  default 127.0.0.1 / 3306

set -u

TIMEOUT="${DB_SETUP_TIMEOUT:-60}"
PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"
MYSQL_HOST="${MYSQL_HOST:-127.0.0.1}"
MYSQL_PORT="${MYSQL_PORT:-3306}"
STRICT=0
[ "${CI:-}" = "true" ] && STRICT=1
FAILED=()

log() { echo "db_setup: $*" >&2; }

# wait_for NAME COMMAND...: run COMMAND once a second until it succeeds or
# TIMEOUT seconds have passed
wait_for() {
    local name="$1"; shift
    local deadline=$(( $(date +%s) + TIMEOUT ))
    while ! "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "$name does not accept connections after ${TIMEOUT}s"
            return 1
        fi
        sleep 1
    done
}

# -- PostgreSQL ---------------------------------------------------------------

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT"; }

# psql as the postgres superuser (trust auth on localhost)
pg_sql() {
    PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres "$@"
}

setup_postgresql() {
    if ! command -v pg_isready >/dev/null || ! command -v psql >/dev/null; then
        log "PostgreSQL client tools (pg_isready, psql) are not installed"
        return 1
    fi
    if ! pg_up; then
        log "PostgreSQL is not accepting connections; starting it"
        local version
        version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
        if [ -z "$version" ] || ! command -v pg_ctlcluster >/dev/null; then
            log "no PostgreSQL cluster under /etc/postgresql to start"
            return 1
        fi
        # exits non-zero if the cluster is already starting; the wait below
        # is what decides
        pg_ctlcluster --skip-systemctl-redirect "$version" main start \
            || log "pg_ctlcluster $version main start returned $?"
    fi
    wait_for PostgreSQL pg_up || return 1
    # pg_isready answers before the server accepts logins during recovery
    wait_for PostgreSQL pg_sql -d postgres -c 'SELECT 1' || return 1

    pg_sql -d postgres <<'SQL' || return 1
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'root') THEN
        CREATE ROLE root LOGIN SUPERUSER;
    END IF;
END
$$;
SQL
    # test: SQLAlchemy's suite (run with --dropfirst, which empties it);
    # shim_tests: the own tests, and shim_bench: the benchmarks -- apart, so
    # that .ci/run can run them at the same time as the suite
    local db
    for db in test shim_tests shim_bench; do
        if [ "$(pg_sql -d postgres -tA -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != "1" ]; then
            pg_sql -d postgres -c "CREATE DATABASE $db OWNER root ENCODING 'utf8' TEMPLATE template0" || return 1
        fi
    done
    pg_sql -d test <<'SQL' || return 1
CREATE SCHEMA IF NOT EXISTS test_schema AUTHORIZATION root;
CREATE SCHEMA IF NOT EXISTS test_schema_2 AUTHORIZATION root;
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE EXTENSION IF NOT EXISTS citext;
ALTER DATABASE test SET default_text_search_config = 'pg_catalog.english';
SQL
    log "PostgreSQL ready on $PGHOST:$PGPORT (dbs test, shim_tests, shim_bench; schemas test_schema, test_schema_2 in test; role root)"
}

# -- MariaDB ------------------------------------------------------------------

mysql_client() {
    local c
    for c in mariadb mysql; do
        command -v "$c" >/dev/null && { echo "$c"; return 0; }
    done
    return 1
}

my_sql() {
    "$MYSQL_CLIENT" --protocol=TCP -h "$MYSQL_HOST" -P "$MYSQL_PORT" -uroot "$@"
}

my_up() { my_sql -e 'SELECT 1'; }

setup_mariadb() {
    if ! MYSQL_CLIENT="$(mysql_client)"; then
        log "MariaDB client (mariadb / mysql) is not installed"
        return 1
    fi
    if ! my_up >/dev/null 2>&1; then
        log "MariaDB is not accepting connections; starting it"
        if [ ! -x /usr/sbin/mariadbd ]; then
            log "/usr/sbin/mariadbd not found"
            return 1
        fi
        # mariadbd refuses to start without its socket directory
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null
        start-stop-daemon --start --oknodo --background \
            --exec /usr/sbin/mariadbd || log "start-stop-daemon returned $?"
    fi
    wait_for MariaDB my_up || return 1

    my_sql <<'SQL' || return 1
CREATE DATABASE IF NOT EXISTS test CHARACTER SET utf8mb4;
CREATE DATABASE IF NOT EXISTS test_schema CHARACTER SET utf8mb4;
CREATE DATABASE IF NOT EXISTS test_schema_2 CHARACTER SET utf8mb4;
CREATE DATABASE IF NOT EXISTS shim_tests CHARACTER SET utf8mb4;
SQL
    log "MariaDB ready on $MYSQL_HOST:$MYSQL_PORT (databases test, test_schema, test_schema_2, shim_tests; user root)"
}

# -- main ---------------------------------------------------------------------

setup_postgresql || FAILED+=(PostgreSQL)
setup_mariadb || FAILED+=(MariaDB)

if [ "${#FAILED[@]}" -gt 0 ]; then
    if [ "$STRICT" = 1 ]; then
        log "ERROR (CI=true): unavailable: ${FAILED[*]}"
        exit 1
    fi
    log "WARNING: unavailable: ${FAILED[*]}; the tests for it will be skipped"
fi
exit 0
