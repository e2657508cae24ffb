#!/bin/sh
# Run once by the postgres image when it makes a new database (/docker-entrypoint-initdb.d):
# the read-only role Grafana logs in with. For a database made before Grafana was added, run the
# same two statements by hand (see "Grafana" in README.md).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v password="$GRAFANA_DB_PASSWORD" <<'SQL'
CREATE ROLE grafana_reader LOGIN PASSWORD :'password';
GRANT pg_read_all_data TO grafana_reader;
SQL
