"""The contract between UI, producer and workers: settings, schemas, names, the Celery app."""
