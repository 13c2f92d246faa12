"""The boundary to MLflow: connection, runs, logged models and the registry."""
