#!/usr/bin/env bash
# The database's own intake ceiling, for comparison with Ferry's intake on
# PostgreSQL (load harness section `intake-pg`): pgbench runs Ferry's
# per-call intake transaction (the shape before group commit) straight
# against the server, as many clients as the harness has connections.
#
# One transaction = BEGIN; nextval; request row; body row (300 B); queue
# row; queue counter upsert; COMMIT, on 16 queues, in a fresh database
# with Ferry's schema (V1, read from src/store/pg/migrate.rs, so it cannot
# drift). The last line printed is `tps <N>`.
#
#   FERRY_TEST_PG_URL=postgres://user@host:port/db bash benches/pg_ceiling.sh [clients] [seconds]
set -euo pipefail
url="${FERRY_TEST_PG_URL:?FERRY_TEST_PG_URL: a PostgreSQL server URL}"
clients="${1:-64}"
secs="${2:-10}"
here="$(cd "$(dirname "$0")/.." && pwd)"
pgbench="${PGBENCH:-$(command -v pgbench || echo /usr/bin/pgbench)}"
psql="${PSQL:-$(command -v psql || echo /usr/bin/psql)}"

db="ferry_ceiling_$$_$RANDOM"
# The same server, another database: replace the URL's path.
rest="${url#*://}"
hostpart="${rest%%/*}"
query=""
[[ "$url" == *\?* ]] && query="?${url#*\?}"
dburl="${url%%://*}://${hostpart}/${db}${query}"

"$psql" -qX "$url" -c "CREATE DATABASE $db" >/dev/null
cleanup() { "$psql" -qX "$url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; rm -f "$script"; }
script="$(mktemp /tmp/ferry-ceiling.XXXXXX.sql)"
trap cleanup EXIT

# Ferry's V1 schema, verbatim.
sed -n '/^const V1: &str = r#"$/,/^"#;$/p' "$here/src/store/pg/migrate.rs" | sed '1d;$d' \
  | "$psql" -qX -v ON_ERROR_STOP=1 "$dburl" >/dev/null

cat >"$script" <<'SQL'
\set m random(0, 15)
BEGIN;
SELECT nextval('ferry_ids') AS id \gset
INSERT INTO requests (id, tenant, custom_id, upstream, model, body_sha256, body_len, callback_url, stream, created_at, status, attempts, batch, submitted_at, completed_at, error, webhook) VALUES (:id, 'bench', 'i' || :id, 'emu', 'bench-' || :m, md5(:id::text) || md5(:m::text), 300, NULL, false, 1700000000, 'queued', 0, NULL, NULL, NULL, NULL, NULL) ON CONFLICT (tenant, custom_id) DO NOTHING;
INSERT INTO bodies (id, body) VALUES (:id, convert_to(repeat('x', 300), 'UTF8'));
INSERT INTO queue (upstream, model, id, enqueued_ms, line_len) VALUES ('emu', 'bench-' || :m, :id, 1700000000000, 400);
INSERT INTO queue_counters AS c (upstream, model, count, bytes) VALUES ('emu', 'bench-' || :m, 1, 400) ON CONFLICT (upstream, model) DO UPDATE SET count = c.count + EXCLUDED.count, bytes = c.bytes + EXCLUDED.bytes;
COMMIT;
SQL

threads=$(nproc)
[ "$threads" -gt "$clients" ] && threads="$clients"
out="$("$pgbench" -n -M prepared -c "$clients" -j "$threads" -T "$secs" -f "$script" "$dburl" 2>&1)" \
  || { echo "$out" >&2; exit 1; }
echo "$out" | grep -E "^(number of clients|number of transactions actually|latency average|tps)" >&2
tps="$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1)"
[ -n "$tps" ] || { echo "$out" >&2; exit 1; }
echo "tps $tps"
