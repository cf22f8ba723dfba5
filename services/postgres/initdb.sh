#!/bin/sh
# First start of the Postgres volume only (docker-entrypoint-initdb.d): MLflow's database beside
# Airflow's, and a read-only role for Grafana's "pipeline runs" panels on Airflow's metadata.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v grafana_password="$GRAFANA_DB_PASSWORD" <<'SQL'
CREATE DATABASE mlflow OWNER flywheel;
CREATE ROLE grafana_reader LOGIN PASSWORD :'grafana_password';
GRANT CONNECT ON DATABASE airflow TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
-- Airflow's tables do not exist yet: `airflow db migrate` creates them later, as flywheel.
ALTER DEFAULT PRIVILEGES FOR ROLE flywheel IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
SQL
