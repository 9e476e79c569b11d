-- The compose stack's second database (the first, prefect, is POSTGRES_DB).
CREATE DATABASE mlflow OWNER recflow;
